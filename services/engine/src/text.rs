//! Turning token bytes into text a client can use: whole UTF-8 characters only, and stop
//! sequences cut exactly even when they straddle tokens.

/// Accumulates token bytes and releases only complete UTF-8 characters: a character split
/// across tokens comes out whole with the token that completes it.
#[derive(Debug, Default)]
pub struct Utf8Buffer {
    pending: Vec<u8>,
}

impl Utf8Buffer {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that can never be UTF-8: replaced, as any decoder would.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + n);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left when generation ends (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text that can be sent now (possibly empty: held back as a possible stop prefix).
    Emit(String),
    /// A stop sequence matched: the text before it, and generation ends.
    Stopped(String),
}

/// Holds back text that might be the start of a stop sequence until it is sure.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.held.push_str(text);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let before = self.held[..pos].to_string();
            self.held.clear();
            return StopOutcome::Stopped(before);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| suffix_prefix_len(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        StopOutcome::Emit(self.held.drain(..cut).collect())
    }

    /// Text held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn suffix_prefix_len(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .filter(|&k| stop.is_char_boundary(k))
        .find(|&k| text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

/// `text` cut to at most `max` bytes on a character boundary, with `…` when cut: for error
/// messages that quote a caller's input or llama.cpp's view of it.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_split_across_tokens_come_out_whole() {
        let mut b = Utf8Buffer::default();
        let euro = "€".as_bytes();
        assert_eq!(b.push(b"a"), "a");
        assert_eq!(b.push(&euro[..1]), "");
        assert_eq!(b.push(&euro[1..2]), "");
        assert_eq!(b.push(&[euro[2], b'b']), "€b");
        assert_eq!(b.push(&[0xff, b'c']), "\u{fffd}c");
        assert_eq!(b.push(&euro[..2]), "");
        assert_eq!(b.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_sequences_cut_exactly_across_pushes() {
        let mut m = StopMatcher::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(m.push("hello E"), StopOutcome::Emit("hello ".into()));
        assert_eq!(m.push("N"), StopOutcome::Emit("".into()));
        assert_eq!(m.push("x"), StopOutcome::Emit("ENx".into()));
        assert_eq!(m.push(" wor\n"), StopOutcome::Emit(" wor".into()));
        assert_eq!(m.push("\nrest"), StopOutcome::Stopped("".into()));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("abcEN"), StopOutcome::Emit("abc".into()));
        assert_eq!(m.push("Dxyz"), StopOutcome::Stopped("".into()));
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("caf"), StopOutcome::Emit("caf".into()));
        assert_eq!(m.push("é"), StopOutcome::Emit("".into()));
        assert_eq!(m.finish(), "é");
        let mut m = StopMatcher::new(vec![String::new()]);
        assert_eq!(m.push("x"), StopOutcome::Emit("x".into()));
    }

    #[test]
    fn truncate_cuts_on_a_character_boundary() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("ééé", 3), "é…");
    }
}
