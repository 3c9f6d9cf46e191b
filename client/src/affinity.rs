//! What the client learned from its own successful calls about which replica is warm for
//! what: which replicas served a model (it is loaded there) and which replica last served a
//! conversation's opening (its prompt cache holds it). Both maps are bounded, oldest entry
//! out first; a forgotten entry only costs a preference, never a call.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

/// Models remembered: more than a deployment serves at once.
const MODELS: usize = 256;
/// Replicas remembered per model: enough to prefer among the replicas of a typical group.
const REPLICAS_PER_MODEL: usize = 16;
/// Conversation openings remembered: recent conversations, about 100 KiB of map.
const PREFIXES: usize = 4096;
/// Bytes of a raw prompt that name its conversation: its continuations repeat them. A
/// shorter prompt has no key (it is cheap to read again anywhere).
pub(crate) const PROMPT_PREFIX_BYTES: usize = 256;
/// Chat messages that name a conversation (the system prompt and the first user turn).
pub(crate) const CHAT_PREFIX_MESSAGES: usize = 2;

/// What makes a replica warm for one call.
#[derive(Clone, Debug, Default)]
pub(crate) struct Warmth {
    pub(crate) model: Option<String>,
    pub(crate) prefix: Option<u64>,
}

impl Warmth {
    pub(crate) fn model(model: &str) -> Self {
        Self {
            model: (!model.is_empty()).then(|| model.to_string()),
            prefix: None,
        }
    }
}

/// The key of a conversation's opening: a hash of `parts` (role and text of its first
/// messages, or its raw prompt's first bytes).
pub(crate) fn prefix_key<'a>(model: &str, parts: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut h = DefaultHasher::new();
    model.hash(&mut h);
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// The first `PROMPT_PREFIX_BYTES` of `prompt` (on a char boundary), or `None` when shorter.
pub(crate) fn prompt_prefix(prompt: &str) -> Option<&str> {
    if prompt.len() < PROMPT_PREFIX_BYTES {
        return None;
    }
    let mut end = PROMPT_PREFIX_BYTES;
    while !prompt.is_char_boundary(end) {
        end -= 1;
    }
    Some(&prompt[..end])
}

/// A map that forgets its oldest insertion beyond `cap` entries.
struct Bounded<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    cap: usize,
}

impl<K: Hash + Eq + Clone, V> Bounded<K, V> {
    fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k)
    }

    fn entry(&mut self, k: K, default: impl FnOnce() -> V) -> &mut V {
        if !self.map.contains_key(&k) {
            if self.order.len() >= self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
            self.order.push_back(k.clone());
        }
        self.map.entry(k).or_insert_with(default)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

pub(crate) struct Affinity {
    models: Bounded<String, Vec<u64>>,
    prefixes: Bounded<u64, u64>,
}

impl Default for Affinity {
    fn default() -> Self {
        Self {
            models: Bounded::new(MODELS),
            prefixes: Bounded::new(PREFIXES),
        }
    }
}

impl Affinity {
    /// 2 when `replica` last served the conversation, 1 when it served the model, else 0.
    pub(crate) fn rank(&self, w: &Warmth, replica: u64) -> u8 {
        if w.prefix.and_then(|p| self.prefixes.get(&p)) == Some(&replica) {
            return 2;
        }
        let served = w
            .model
            .as_ref()
            .and_then(|m| self.models.get(m))
            .is_some_and(|rs| rs.contains(&replica));
        u8::from(served)
    }

    /// `replica` answered a call for `w`.
    pub(crate) fn served(&mut self, w: &Warmth, replica: u64) {
        if let Some(m) = &w.model {
            let rs = self.models.entry(m.clone(), Vec::new);
            if !rs.contains(&replica) {
                if rs.len() >= REPLICAS_PER_MODEL {
                    rs.remove(0);
                }
                rs.push(replica);
            }
        }
        if let Some(p) = w.prefix {
            *self.prefixes.entry(p, || replica) = replica;
        }
    }

    /// A replica left the set: nothing should prefer it any more.
    pub(crate) fn forget(&mut self, replica: u64) {
        for rs in self.models.map.values_mut() {
            rs.retain(|r| *r != replica);
        }
        self.prefixes.map.retain(|_, r| *r != replica);
        let prefixes = &self.prefixes.map;
        self.prefixes.order.retain(|k| prefixes.contains_key(k));
    }

    #[cfg(test)]
    fn sizes(&self) -> (usize, usize) {
        (self.models.len(), self.prefixes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_models_and_prefixes_rank_their_replicas() {
        let mut a = Affinity::default();
        let chat = Warmth {
            model: Some("m".into()),
            prefix: Some(prefix_key("m", ["system", "be brief", "user", "hi"])),
        };
        assert_eq!(a.rank(&chat, 1), 0);
        a.served(&Warmth::model("m"), 1);
        a.served(&chat, 2);
        assert_eq!(a.rank(&chat, 1), 1, "has the model");
        assert_eq!(a.rank(&chat, 2), 2, "has the conversation");
        assert_eq!(a.rank(&Warmth::model("other"), 1), 0);
        a.forget(2);
        assert_eq!(a.rank(&chat, 2), 0);
    }

    #[test]
    fn maps_stay_bounded() {
        let mut a = Affinity::default();
        for i in 0..(PREFIXES as u64 + 100) {
            a.served(
                &Warmth {
                    model: Some(format!("m{i}")),
                    prefix: Some(i),
                },
                i % 3,
            );
        }
        assert_eq!(a.sizes(), (MODELS, PREFIXES));
        // The oldest went first.
        assert_eq!(
            a.rank(
                &Warmth {
                    model: None,
                    prefix: Some(0)
                },
                0
            ),
            0
        );
    }

    #[test]
    fn short_prompts_have_no_prefix_and_long_ones_cut_on_a_char() {
        assert_eq!(prompt_prefix("short"), None);
        let long = "é".repeat(PROMPT_PREFIX_BYTES);
        let p = prompt_prefix(&long).unwrap();
        assert!(p.len() <= PROMPT_PREFIX_BYTES && p.len() >= PROMPT_PREFIX_BYTES - 1);
    }
}
