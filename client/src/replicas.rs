//! The servers behind one client endpoint. An endpoint names one server (`host:port`) or
//! many: a comma-separated list (`http://a:50053,http://b:50053`), or a DNS name that resolves
//! to several addresses (a Kubernetes headless Service, a Compose service scaled to N). Names
//! are resolved again every [`RESOLVE_EVERY`]; a name with fewer than two addresses (or only
//! loopback ones) stays one channel on the name, exactly as a plain endpoint always was.
//! With more than one replica, each one's health is watched so a draining replica (SIGTERM:
//! NOT_SERVING) gets no new calls while its streams finish.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tonic::transport::Uri;

use crate::affinity::{Affinity, Warmth};
use crate::balance::{pick, InFlight, Replica};
use crate::call::{self, ConnectOptions, Transport};
use crate::ClientError;

/// How often names are resolved again: soon enough to follow a scale-up or a rolling update,
/// rarely enough to cost the resolver nothing.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(15);
/// A lookup that takes longer keeps the addresses already known.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Replicas one client spreads over at most (list entries and resolved addresses together):
/// each is a connection and a health watch.
pub const MAX_REPLICAS: usize = 64;
/// A health watch that broke, or saw NOT_SERVING, is opened again after this (the replica
/// may be restarting, or warming up).
const REWATCH_AFTER: Duration = Duration::from_secs(2);
/// An endpoint quoted in an error is cut to this many bytes.
const QUOTE: usize = 120;

/// One entry of an endpoint list.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// `scheme://host:port` as given (scheme added when missing).
    pub uri: String,
    pub scheme: String,
    pub host: String,
    pub port: u16,
    /// The host is an IP address: nothing to resolve.
    pub is_ip: bool,
}

fn quote(s: &str) -> String {
    if s.len() <= QUOTE {
        return s.to_string();
    }
    let mut end = QUOTE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// The entries of `spec`: one endpoint or a comma-separated list, each `host:port`,
/// `http://host:port` or `https://host:port`; duplicates count once.
pub fn parse_endpoints(spec: &str) -> Result<Vec<Target>, ClientError> {
    let mut out: Vec<Target> = Vec::new();
    for entry in spec.split(',') {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(ClientError::InvalidEndpoint(format!(
                "{}: an empty entry in the endpoint list",
                quote(spec)
            )));
        }
        let target = parse_one(entry)?;
        if !out.contains(&target) {
            out.push(target);
        }
        if out.len() > MAX_REPLICAS {
            return Err(ClientError::InvalidEndpoint(format!(
                "more than {MAX_REPLICAS} endpoints in one list"
            )));
        }
    }
    Ok(out)
}

fn parse_one(entry: &str) -> Result<Target, ClientError> {
    let uri = if entry.contains("://") {
        entry.to_string()
    } else {
        format!("http://{entry}")
    };
    let bad = |why: &str| ClientError::InvalidEndpoint(format!("{}: {why}", quote(entry)));
    let parsed: Uri = uri.parse().map_err(|e| bad(&format!("{e}")))?;
    let scheme = parsed.scheme_str().unwrap_or("http").to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(bad("the scheme must be http or https"));
    }
    let host = parsed.host().ok_or_else(|| bad("no host"))?;
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if parsed.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(bad("an endpoint has no path"));
    }
    let port = parsed
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    Ok(Target {
        uri: uri.trim_end_matches('/').to_string(),
        scheme,
        host: host.to_string(),
        port,
        is_ip: bare.parse::<IpAddr>().is_ok(),
    })
}

/// The addresses to use for a name that resolved to `addrs`: one replica each when there
/// are at least two that are not loopback; otherwise `None` (one channel on the name, as a
/// plain endpoint: `localhost` is one server however it resolves).
pub fn spread_addresses(addrs: &[IpAddr]) -> Option<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = Vec::new();
    for a in addrs {
        if !a.is_loopback() && !out.contains(a) && out.len() < MAX_REPLICAS {
            out.push(*a);
        }
    }
    (out.len() >= 2).then_some(out)
}

/// Where one replica is: its key (`scheme://addr:port`) and, for an address resolved from a
/// name, the name (TLS checks the certificate against it, and calls carry it as authority).
#[derive(Clone, Debug, PartialEq)]
struct Slot {
    key: String,
    name: Option<Target>,
}

fn slots_of(t: &Target, resolved: Option<&[IpAddr]>) -> Vec<Slot> {
    match resolved.and_then(spread_addresses) {
        Some(addrs) => addrs
            .iter()
            .map(|ip| {
                let host = match ip {
                    IpAddr::V6(v6) => format!("[{v6}]"),
                    IpAddr::V4(v4) => v4.to_string(),
                };
                Slot {
                    key: format!("{}://{host}:{}", t.scheme, t.port),
                    name: Some(t.clone()),
                }
            })
            .collect(),
        None => vec![Slot {
            key: t.uri.clone(),
            name: None,
        }],
    }
}

/// The replicas of one client, shared by its clones.
pub(crate) struct ReplicaSet {
    replicas: RwLock<Arc<Vec<Arc<Replica>>>>,
    affinity: Mutex<Affinity>,
    /// Becomes true once every name was looked up (or there was nothing to look up).
    resolved: watch::Receiver<bool>,
    /// For replicas that appear later; `None` for a fixed set (one channel, in-process).
    connect: Option<Connect>,
    next_id: std::sync::atomic::AtomicU64,
}

struct Connect {
    targets: Vec<Target>,
    opts: ConnectOptions,
    /// The slots of each target last time (kept when a lookup fails).
    slots: Mutex<Vec<Vec<Slot>>>,
}

impl ReplicaSet {
    /// One fixed channel (in-process, or a caller's own).
    pub(crate) fn single(transport: Transport) -> Arc<Self> {
        let (_, resolved) = watch::channel(true);
        Arc::new(Self {
            replicas: RwLock::new(Arc::new(vec![Arc::new(Replica::new(
                0,
                "channel".into(),
                transport,
            ))])),
            affinity: Mutex::default(),
            resolved,
            connect: None,
            next_id: 1.into(),
        })
    }

    /// The replicas `spec` names, connecting lazily. Names are resolved in the background
    /// (inside a Tokio runtime); until then each name is one channel on the name.
    pub(crate) fn connect(spec: &str, opts: &ConnectOptions) -> Result<Arc<Self>, ClientError> {
        let targets = parse_endpoints(spec)?;
        let slots: Vec<Vec<Slot>> = targets.iter().map(|t| slots_of(t, None)).collect();
        let (resolved_tx, resolved) = watch::channel(false);
        let set = Arc::new(Self {
            replicas: RwLock::new(Arc::new(Vec::new())),
            affinity: Mutex::default(),
            resolved,
            connect: Some(Connect {
                targets,
                opts: opts.clone(),
                slots: Mutex::new(slots),
            }),
            next_id: 0.into(),
        });
        set.rebuild()?;
        let names = set
            .connect
            .as_ref()
            .is_some_and(|c| c.targets.iter().any(|t| !t.is_ip));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if names => {
                rt.spawn(resolve_loop(Arc::downgrade(&set), resolved_tx));
            }
            _ => {
                let _ = resolved_tx.send(true);
            }
        }
        Ok(set)
    }

    pub(crate) fn snapshot(&self) -> Arc<Vec<Arc<Replica>>> {
        self.replicas
            .read()
            .map(|r| Arc::clone(&r))
            .unwrap_or_default()
    }

    /// How many replicas there are once names were first resolved (waiting for that at most
    /// `RESOLVE_TIMEOUT`).
    pub(crate) async fn count(&self) -> usize {
        let mut rx = self.resolved.clone();
        let _ = tokio::time::timeout(RESOLVE_TIMEOUT, rx.wait_for(|r| *r)).await;
        self.snapshot().len()
    }

    /// The replica for a call warm for `w`, avoiding `tried`; counted in flight until the
    /// guard drops.
    pub(crate) fn choose(&self, tried: &[u64], w: &Warmth) -> InFlight {
        let replicas = self.snapshot();
        let chosen = {
            let affinity = self.affinity.lock().ok();
            let rank = |r: &Replica| affinity.as_ref().map_or(0, |a| a.rank(w, r.id));
            pick(&replicas, tried, rank, &mut rand::rng()).cloned()
        };
        // The set is never empty: every target keeps at least one slot.
        InFlight::new(chosen.unwrap_or_else(|| Arc::clone(&replicas[0])))
    }

    /// How the call for `w` on the replica behind `guard` ended: an answer makes the replica
    /// warm for `w`; a failure may eject it.
    pub(crate) fn settle<T>(&self, guard: &InFlight, w: &Warmth, r: &Result<T, tonic::Status>) {
        let Err(s) = r else {
            guard.replica().succeeded();
            if self.is_multi() {
                if let Ok(mut a) = self.affinity.lock() {
                    a.served(w, guard.replica().id);
                }
            }
            return;
        };
        guard.replica().call_failed(s);
    }

    fn is_multi(&self) -> bool {
        self.snapshot().len() > 1
    }

    /// Rebuilds the replica list from the current slots, keeping replicas whose key is
    /// unchanged (their connection, counters and health).
    fn rebuild(&self) -> Result<(), ClientError> {
        let Some(c) = &self.connect else {
            return Ok(());
        };
        let slots: Vec<Slot> = c
            .slots
            .lock()
            .map(|s| s.iter().flatten().cloned().collect())
            .unwrap_or_default();
        let old = self.snapshot();
        let multi = slots.len() > 1;
        let mut new = Vec::with_capacity(slots.len().min(MAX_REPLICAS));
        for slot in slots.into_iter().take(MAX_REPLICAS) {
            if new.iter().any(|r: &Arc<Replica>| r.addr == slot.key) {
                continue;
            }
            if let Some(r) = old.iter().find(|r| r.addr == slot.key) {
                new.push(Arc::clone(r));
                continue;
            }
            let transport = match &slot.name {
                None => call::connect(&slot.key, &c.opts)?,
                Some(t) => call::connect_as(&slot.key, t, &c.opts)?,
            };
            let id = self
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let replica = Arc::new(Replica::new(id, slot.key, transport));
            if multi {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(watch_health(Arc::downgrade(&replica)));
                }
            }
            new.push(replica);
        }
        if let Ok(mut a) = self.affinity.lock() {
            for gone in old.iter().filter(|o| !new.iter().any(|n| n.id == o.id)) {
                a.forget(gone.id);
            }
        }
        if new.len() != old.len() && !old.is_empty() {
            tracing::info!(
                replicas = new.len(),
                "replica set changed: {}",
                new.iter()
                    .map(|r| r.addr.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        if let Ok(mut r) = self.replicas.write() {
            *r = Arc::new(new);
        }
        Ok(())
    }

    /// Looks every name up once; a failed lookup keeps what the name had.
    async fn resolve(&self) {
        let Some(c) = &self.connect else {
            return;
        };
        let mut fresh = Vec::with_capacity(c.targets.len());
        for t in &c.targets {
            if t.is_ip {
                fresh.push(None);
                continue;
            }
            let host = t.host.trim_start_matches('[').trim_end_matches(']');
            let lookup = tokio::net::lookup_host((host, t.port));
            match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Ok(Ok(addrs)) => {
                    let ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                    fresh.push(Some(slots_of(t, Some(&ips))));
                }
                Ok(Err(e)) => {
                    tracing::debug!(host = %quote(&t.host), error = %e, "lookup failed; keeping the known addresses");
                    fresh.push(None);
                }
                Err(_) => fresh.push(None),
            }
        }
        if let Ok(mut slots) = c.slots.lock() {
            for (i, f) in fresh.into_iter().enumerate() {
                if let Some(f) = f {
                    slots[i] = f;
                }
            }
        }
        if let Err(e) = self.rebuild() {
            tracing::warn!(error = %e, "replica set not updated");
        }
    }
}

/// Resolves the set's names now and every [`RESOLVE_EVERY`], until the set is dropped.
async fn resolve_loop(set: Weak<ReplicaSet>, resolved: watch::Sender<bool>) {
    loop {
        let Some(s) = set.upgrade() else {
            return;
        };
        s.resolve().await;
        drop(s);
        let _ = resolved.send(true);
        tokio::time::sleep(RESOLVE_EVERY).await;
    }
}

/// Follows a replica's health (grpc.health.v1 Watch on the whole server) until the replica
/// leaves the set. A server without the health service is taken as always serving.
async fn watch_health(replica: Weak<Replica>) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    loop {
        let Some(r) = replica.upgrade() else {
            return;
        };
        let mut client = HealthClient::new(r.transport.clone());
        drop(r);
        let req = HealthCheckRequest {
            service: String::new(),
        };
        match client.watch(req).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    // Wakes now and then to notice a replica that left the set.
                    let next = tokio::time::timeout(RESOLVE_EVERY, stream.next()).await;
                    let Some(r) = replica.upgrade() else {
                        return;
                    };
                    match next {
                        Err(_) => continue,
                        Ok(Some(Ok(msg))) => {
                            let serving = msg.status == ServingStatus::Serving as i32;
                            r.set_draining(!serving);
                            // A draining server waits for every open stream, this one too:
                            // let go, and look again later (a warming one turns SERVING).
                            if !serving {
                                break;
                            }
                        }
                        // The server went away: the next call there finds out and ejects it.
                        Ok(Some(Err(_))) | Ok(None) => break,
                    }
                }
            }
            Err(s) if s.code() == tonic::Code::Unimplemented => return,
            Err(_) => {}
        }
        tokio::time::sleep(REWATCH_AFTER).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_with_schemes_ports_and_duplicates() {
        let t = parse_endpoints("a:1, http://b:2,https://c,[::1]:4,10.0.0.1:5,a:1").unwrap();
        let uris: Vec<&str> = t.iter().map(|t| t.uri.as_str()).collect();
        assert_eq!(
            uris,
            [
                "http://a:1",
                "http://b:2",
                "https://c",
                "http://[::1]:4",
                "http://10.0.0.1:5"
            ]
        );
        assert_eq!(t[2].port, 443);
        assert!(!t[0].is_ip && t[3].is_ip && t[4].is_ip);
        assert_eq!(t[1].host, "b");
    }

    #[test]
    fn bad_lists_are_refused_with_a_bounded_message() {
        for bad in [
            "",
            "a:1,,b:2",
            "a:1,",
            "ftp://a:1",
            "http://a:1/path",
            "http://:1",
        ] {
            assert!(parse_endpoints(bad).is_err(), "{bad:?}");
        }
        let long = format!("http://{}:1/x", "h".repeat(10_000));
        let msg = parse_endpoints(&long).unwrap_err().to_string();
        assert!(msg.len() < 400, "{msg}");
        let many = (0..=MAX_REPLICAS)
            .map(|i| format!("h{i}:1"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(parse_endpoints(&many).is_err());
    }

    #[test]
    fn names_spread_only_over_two_or_more_non_loopback_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(spread_addresses(&[ip("10.0.0.1")]), None);
        assert_eq!(spread_addresses(&[ip("127.0.0.1"), ip("::1")]), None);
        assert_eq!(
            spread_addresses(&[ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.1")]),
            Some(vec![ip("10.0.0.1"), ip("10.0.0.2")])
        );
        let t = parse_one("https://svc.ns:50053").unwrap();
        let slots = slots_of(&t, Some(&[ip("10.0.0.1"), ip("fd00::2")]));
        let keys: Vec<&str> = slots.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["https://10.0.0.1:50053", "https://[fd00::2]:50053"]);
        assert_eq!(slots[0].name.as_ref().unwrap().host, "svc.ns");
        assert_eq!(slots_of(&t, Some(&[ip("10.0.0.1")]))[0].key, t.uri);
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_stays_one_channel_and_lists_give_one_each() {
        let set = ReplicaSet::connect("localhost:1", &ConnectOptions::default()).unwrap();
        assert_eq!(set.count().await, 1);
        assert_eq!(set.snapshot()[0].addr, "http://localhost:1");
        let set =
            ReplicaSet::connect("127.0.0.1:1,127.0.0.1:2", &ConnectOptions::default()).unwrap();
        assert_eq!(set.count().await, 2);
    }
}
