//! Which replica takes the next call: power of two choices on calls in flight, with a soft
//! preference for a replica that is warm for the call (its prompt prefix cached, its model
//! loaded). Two random choices keep a burst of callers from all landing on the one replica
//! that looked idlest a moment ago, while still steering away from a loaded one.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use rand::Rng;

use crate::call::Transport;

/// A replica holding the call's conversation (rank 2) keeps the call unless it has more
/// than this many calls in flight beyond the other choice: re-reading a long prompt costs
/// more than waiting behind a couple of calls, but not more than a queue. A replica that
/// only has the model loaded (rank 1) wins ties only: a load is paid once per replica, and
/// a bulk job should spread at once rather than pile onto the first warm replica.
pub(crate) const WARM_SLACK: usize = 2;

/// A replica that failed at the transport level gets no new calls for this long, doubling
/// per failure in a row up to [`MAX_EJECTION`]; then one call tries it again.
const FIRST_EJECTION: Duration = Duration::from_secs(1);
const MAX_EJECTION: Duration = Duration::from_secs(30);

/// One server behind the client.
pub(crate) struct Replica {
    pub(crate) id: u64,
    /// `scheme://addr:port`, for logs and for keeping a replica across re-resolutions.
    pub(crate) addr: String,
    pub(crate) transport: Transport,
    in_flight: AtomicUsize,
    failures: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
    /// Its health says NOT_SERVING (draining on SIGTERM, or still warming up).
    draining: AtomicBool,
}

impl Replica {
    pub(crate) fn new(id: u64, addr: String, transport: Transport) -> Self {
        Self {
            id,
            addr,
            transport,
            in_flight: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
            draining: AtomicBool::new(false),
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Takes new calls: not ejected after a failure and not draining.
    pub(crate) fn available(&self, now: Instant) -> bool {
        !self.is_draining()
            && self
                .ejected_until
                .lock()
                .map_or(true, |u| u.is_none_or(|t| now >= t))
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn set_draining(&self, draining: bool) {
        if self.draining.swap(draining, Ordering::Relaxed) != draining {
            tracing::debug!(replica = %self.addr, draining, "replica health changed");
        }
    }

    /// A call on it failed with `s`. UNAVAILABLE says the server is not there (refused,
    /// reset, draining): it gets no new calls for a while. A full queue (RESOURCE_EXHAUSTED)
    /// is a busy replica, not a missing one.
    pub(crate) fn call_failed(&self, s: &tonic::Status) {
        if s.code() == tonic::Code::Unavailable {
            self.failed();
        }
    }

    fn failed(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(5);
        let pause = (FIRST_EJECTION * 2u32.pow(n)).min(MAX_EJECTION);
        if let Ok(mut u) = self.ejected_until.lock() {
            *u = Some(Instant::now() + pause);
        }
        tracing::debug!(replica = %self.addr, ?pause, "replica ejected");
    }

    pub(crate) fn succeeded(&self) {
        if self.failures.swap(0, Ordering::Relaxed) > 0 {
            if let Ok(mut u) = self.ejected_until.lock() {
                *u = None;
            }
        }
    }
}

/// One call in flight on a replica; dropping it (the call's end, or its stream's) counts it
/// out.
pub(crate) struct InFlight {
    replica: Arc<Replica>,
}

impl InFlight {
    pub(crate) fn new(replica: Arc<Replica>) -> Self {
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        Self { replica }
    }

    pub(crate) fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// The replica's address (`http://10.0.0.7:50053`).
    pub(crate) fn addr(&self) -> &str {
        &self.replica.addr
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.replica.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The replica for the next call, or `None` when `replicas` is empty. `rank` says how warm a
/// replica is for this call (higher is warmer). Replicas in `tried` (this call's earlier
/// attempts) and unavailable ones are avoided while any other is left.
pub(crate) fn pick<'a>(
    replicas: &'a [Arc<Replica>],
    tried: &[u64],
    rank: impl Fn(&Replica) -> u8,
    rng: &mut impl Rng,
) -> Option<&'a Arc<Replica>> {
    let now = Instant::now();
    let fresh = |r: &&Arc<Replica>| !tried.contains(&r.id);
    let up = |r: &&Arc<Replica>| r.available(now);
    // The best pool that is not empty: untried and up, then untried, then up, then all.
    let pool: Vec<&Arc<Replica>> = [
        replicas.iter().filter(|r| fresh(r) && up(r)).collect(),
        replicas.iter().filter(fresh).collect(),
        replicas.iter().filter(up).collect(),
        replicas.iter().collect::<Vec<_>>(),
    ]
    .into_iter()
    .find(|p: &Vec<_>| !p.is_empty())?;
    if pool.len() == 1 {
        return Some(pool[0]);
    }
    let ranks: Vec<u8> = pool.iter().map(|r| rank(r)).collect();
    let best = *ranks.iter().max().unwrap_or(&0);
    // The first choice comes from the warmest replicas, the second from all the others.
    let warmest: Vec<usize> = (0..pool.len()).filter(|&i| ranks[i] == best).collect();
    let a = warmest[rng.random_range(0..warmest.len())];
    let mut b = rng.random_range(0..pool.len() - 1);
    if b >= a {
        b += 1;
    }
    let (load_a, load_b) = (pool[a].in_flight(), pool[b].in_flight());
    let slack = if ranks[a] > ranks[b] && ranks[a] >= 2 {
        WARM_SLACK
    } else {
        0
    };
    let keep_a = load_a <= load_b + slack;
    Some(if keep_a { pool[a] } else { pool[b] })
}

/// `stream`, keeping its call counted on its replica while it lives, and ejecting the
/// replica when the stream breaks at the transport level.
pub(crate) fn watched<T>(
    stream: impl Stream<Item = Result<T, tonic::Status>>,
    guard: InFlight,
) -> impl Stream<Item = Result<T, tonic::Status>> {
    stream.map(move |r| {
        if let Err(s) = &r {
            guard.replica().call_failed(s);
        }
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn replicas(n: usize) -> Vec<Arc<Replica>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        (0..n)
            .map(|i| {
                let ch =
                    tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
                Arc::new(Replica::new(
                    i as u64,
                    format!("r{i}"),
                    crate::call::plain(ch),
                ))
            })
            .collect()
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    #[test]
    fn the_less_loaded_of_two_wins() {
        let rs = replicas(2);
        let _busy: Vec<InFlight> = (0..3).map(|_| InFlight::new(rs[0].clone())).collect();
        for _ in 0..20 {
            assert_eq!(pick(&rs, &[], |_| 0, &mut rng()).unwrap().id, 1);
        }
    }

    #[test]
    fn guards_count_calls_until_dropped() {
        let rs = replicas(1);
        let g = InFlight::new(rs[0].clone());
        let h = InFlight::new(rs[0].clone());
        assert_eq!(rs[0].in_flight(), 2);
        drop(g);
        assert_eq!(rs[0].in_flight(), 1);
        drop(h);
        assert_eq!(rs[0].in_flight(), 0);
    }

    #[test]
    fn load_spreads_over_many_replicas() {
        let rs = replicas(4);
        let mut r = rng();
        let held: Vec<InFlight> = (0..40)
            .map(|_| InFlight::new(pick(&rs, &[], |_| 0, &mut r).unwrap().clone()))
            .collect();
        // Two choices keep every replica within a few calls of the mean (10).
        for rep in &rs {
            assert!((7..=13).contains(&rep.in_flight()), "{}", rep.in_flight());
        }
        drop(held);
    }

    #[test]
    fn a_replica_with_the_model_wins_ties_only() {
        let rs = replicas(2);
        let loaded = |r: &Replica| u8::from(r.id == 1);
        for _ in 0..20 {
            assert_eq!(pick(&rs, &[], loaded, &mut rng()).unwrap().id, 1);
        }
        let _busy = InFlight::new(rs[1].clone());
        for _ in 0..20 {
            assert_eq!(pick(&rs, &[], loaded, &mut rng()).unwrap().id, 0);
        }
    }

    #[test]
    fn a_replica_with_the_conversation_keeps_calls_within_the_slack() {
        let rs = replicas(3);
        let warm = |r: &Replica| if r.id == 2 { 2 } else { 0 };
        let mut held = Vec::new();
        for _ in 0..=WARM_SLACK {
            let p = pick(&rs, &[], warm, &mut rng()).unwrap();
            assert_eq!(p.id, 2);
            held.push(InFlight::new(p.clone()));
        }
        // Now it is more than the slack ahead of any idle replica: the other choice wins.
        let p = pick(&rs, &[], warm, &mut rng()).unwrap();
        assert_ne!(p.id, 2);
    }

    #[test]
    fn tried_ejected_and_draining_replicas_are_avoided_while_others_remain() {
        let rs = replicas(3);
        let mut r = rng();
        for _ in 0..20 {
            assert_eq!(pick(&rs, &[0, 1], |_| 0, &mut r).unwrap().id, 2);
        }
        rs[0].failed();
        rs[1].set_draining(true);
        for _ in 0..20 {
            assert_eq!(pick(&rs, &[], |_| 0, &mut r).unwrap().id, 2);
        }
        // Every replica tried: the call still goes somewhere that is up.
        for _ in 0..20 {
            assert_eq!(pick(&rs, &[0, 1, 2], |_| 0, &mut r).unwrap().id, 2);
        }
        rs[0].succeeded();
        assert!(rs[0].available(Instant::now()));
        assert!(pick(&[], &[], |_| 0, &mut r).is_none());
    }
}
