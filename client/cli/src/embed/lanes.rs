//! Batches spread over the embedder's replicas: one EmbedStream ("lane") per replica, each
//! taking the next batch as it has room, answers put back in input order before they are
//! written. A lane whose stream breaks (its replica killed, restarting, drained) gives its
//! unanswered batches back and they go out again on a live lane, so every row is written
//! exactly once whatever happens to a replica. A lane whose replica starts draining sends it
//! nothing more, lets it answer what it has, and opens again elsewhere.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use anyhow::bail;
use futures::StreamExt;
use llama_agent_client::proto::embedder::v1 as pb;
use llama_agent_client::{ClientError, EmbedderClient};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Code;
use tracing::Instrument;

use super::input::Row;

/// Batches a lane has sent (or queued to send) and not had answered: the client's send-ahead
/// plus the server's own pipeline, so a lane is never starved by this limit.
const LANE_WINDOW: usize = 8;
/// Times a batch goes out on a stream that then breaks before the job gives up on it; and
/// times in a row a lane may fail to open. The same count the client's retries use.
const ATTEMPTS: u32 = 5;
/// The pause before a failed lane opens again doubles from this, up to `MAX_PAUSE`.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(3);
/// How often a lane looks whether its replica started draining.
const DRAIN_CHECK: Duration = Duration::from_millis(200);
/// Lane events waiting for the coordinator: lanes pause while it writes.
const EVENTS: usize = 64;

/// One batch of input rows, numbered in input order.
struct Batch {
    seq: u64,
    rows: Vec<Row>,
    /// Streams it went out on that broke.
    attempts: u32,
}

enum Event {
    Opened {
        lane: usize,
        replica: String,
    },
    Answer {
        lane: usize,
        resp: pb::EmbedStreamResponse,
    },
    /// The replica started draining: this lane sends nothing more.
    Draining {
        lane: usize,
    },
    /// The stream broke (`opened`: after it was open).
    Failed {
        lane: usize,
        err: ClientError,
        opened: bool,
    },
    /// The stream ended after the lane half-closed it.
    Closed {
        lane: usize,
    },
}

#[derive(Default)]
struct Lane {
    /// Where the next batches go; `None` when the lane is not running or sends no more.
    tx: Option<mpsc::Sender<Vec<pb::TextItem>>>,
    running: bool,
    /// Opening, not yet answered with Opened or Failed: only one lane opens at a time, so
    /// each sees the others' streams counted on their replicas and picks another.
    opening: bool,
    sent: VecDeque<Batch>,
    /// Open failures in a row.
    failures: u32,
    /// Its replica is draining: the stream ends by the replica's choice, not a failure.
    draining: bool,
    ready_at: Option<Instant>,
}

/// What the lanes are given: the model and options every stream opens with.
pub struct Job {
    pub model: String,
    pub options: pb::EmbedOptions,
}

/// Embeds `first` and every batch of `input` over `lanes` streams of `client`, calling
/// `write` with each batch's rows and answer in input order. An input error ends the job
/// after the rows before it are written.
pub async fn run(
    client: &EmbedderClient,
    job: &Job,
    lanes: usize,
    first: Vec<Row>,
    mut input: mpsc::Receiver<anyhow::Result<Vec<Row>>>,
    mut write: impl FnMut(Vec<Row>, pb::EmbedStreamResponse) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let lanes = lanes.max(1);
    // Batches read and not yet written: bounds the reordering buffer.
    let window = (lanes * LANE_WINDOW) as u64;
    let (events_tx, mut events) = mpsc::channel::<Event>(EVENTS);
    let mut slots: Vec<Lane> = (0..lanes).map(|_| Lane::default()).collect();
    let mut pending: VecDeque<Batch> = VecDeque::from([Batch {
        seq: 0,
        rows: first,
        attempts: 0,
    }]);
    let (mut next_seq, mut next_write) = (1u64, 0u64);
    let mut done_reading = false;
    let mut input_error: Option<anyhow::Error> = None;
    let mut answered: BTreeMap<u64, (Vec<Row>, pb::EmbedStreamResponse)> = BTreeMap::new();

    loop {
        // Read what the window allows and the input has ready.
        while !done_reading && next_seq - next_write < window {
            match input.try_recv() {
                Ok(Ok(rows)) => {
                    pending.push_back(Batch {
                        seq: next_seq,
                        rows,
                        attempts: 0,
                    });
                    next_seq += 1;
                }
                Ok(Err(e)) => {
                    input_error = Some(e);
                    done_reading = true;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => done_reading = true,
                Err(mpsc::error::TryRecvError::Empty) => break,
            }
        }
        assign(&mut slots, &mut pending, client, job, &events_tx);
        if done_reading && pending.is_empty() {
            // Nothing more will come: running lanes half-close and end once answered.
            for s in slots.iter_mut() {
                s.tx = None;
            }
            if slots.iter().all(|s| !s.running) {
                break;
            }
        }
        let want_input = !done_reading && next_seq - next_write < window;
        let wake = slots
            .iter()
            .filter(|s| !s.running && !pending.is_empty())
            .filter_map(|s| s.ready_at)
            .min();
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { bail!("the embedding lanes stopped") };
                handle(ev, &mut slots, &mut pending, &mut answered)?;
                while let Some((rows, resp)) = answered.remove(&next_write) {
                    write(rows, resp)?;
                    next_write += 1;
                }
            }
            rows = input.recv(), if want_input => match rows {
                Some(Ok(rows)) => {
                    pending.push_back(Batch { seq: next_seq, rows, attempts: 0 });
                    next_seq += 1;
                }
                Some(Err(e)) => {
                    input_error = Some(e);
                    done_reading = true;
                }
                None => done_reading = true,
            },
            _ = sleep_until(wake), if wake.is_some() => {}
        }
    }
    if !answered.is_empty() {
        bail!("the embedder left batches unanswered");
    }
    match input_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn sleep_until(t: Option<Instant>) {
    if let Some(t) = t {
        tokio::time::sleep_until(t).await;
    }
}

/// Gives pending batches to lanes with room, and opens a lane where one is down and ready.
fn assign(
    slots: &mut [Lane],
    pending: &mut VecDeque<Batch>,
    client: &EmbedderClient,
    job: &Job,
    events: &mpsc::Sender<Event>,
) {
    let now = Instant::now();
    for s in slots.iter_mut() {
        if let Some(tx) = &s.tx {
            while s.sent.len() < LANE_WINDOW {
                let Some(b) = pending.pop_front() else { break };
                // A lane that already ended hands the batch back with its Failed or Closed.
                let _ = tx.try_send(items(&b.rows));
                s.sent.push_back(b);
            }
        }
    }
    let opening = slots.iter().any(|s| s.opening);
    if opening || pending.is_empty() {
        return;
    }
    let Some((lane, s)) = slots
        .iter_mut()
        .enumerate()
        .find(|(_, s)| !s.running && s.ready_at.is_none_or(|t| now >= t))
    else {
        return;
    };
    let Some(b) = pending.pop_front() else { return };
    let first = pb::EmbedStreamRequest {
        model: job.model.clone(),
        options: Some(job.options.clone()),
        items: items(&b.rows),
    };
    s.sent.push_back(b);
    let (tx, rx) = mpsc::channel(LANE_WINDOW);
    s.tx = Some(tx);
    s.running = true;
    s.opening = true;
    // In the run's span: the stream's call carries this run's trace to the replica.
    let span = tracing::Span::current();
    tokio::spawn(stream(client.clone(), first, rx, lane, events.clone()).instrument(span));
}

/// One lane's stream: batches from `rx` out, answers and what happens back as events.
async fn stream(
    client: EmbedderClient,
    first: pb::EmbedStreamRequest,
    mut rx: mpsc::Receiver<Vec<pb::TextItem>>,
    lane: usize,
    events: mpsc::Sender<Event>,
) {
    let (sender, responses) = match client.embed_stream(first).await {
        Ok(s) => s,
        Err(err) => {
            let _ = events
                .send(Event::Failed {
                    lane,
                    err,
                    opened: false,
                })
                .await;
            return;
        }
    };
    let replica = sender.replica().to_string();
    let _ = events.send(Event::Opened { lane, replica }).await;
    let drain_events = events.clone();
    let forward = tokio::spawn(async move {
        let mut tick = tokio::time::interval(DRAIN_CHECK);
        loop {
            if sender.replica_draining() {
                let _ = drain_events.send(Event::Draining { lane }).await;
                break;
            }
            tokio::select! {
                b = rx.recv() => match b {
                    Some(b) => if sender.send(b).await.is_err() { break },
                    None => break,
                },
                _ = tick.tick() => {}
            }
        }
        // Dropping the sender half-closes the stream: the replica answers what it has.
        sender.finish();
    });
    let mut responses = std::pin::pin!(responses);
    let end = loop {
        match responses.next().await {
            Some(Ok(resp)) => {
                if events.send(Event::Answer { lane, resp }).await.is_err() {
                    break None;
                }
            }
            Some(Err(err)) => {
                break Some(Event::Failed {
                    lane,
                    err,
                    opened: true,
                })
            }
            None => break Some(Event::Closed { lane }),
        }
    };
    forward.abort();
    if let Some(ev) = end {
        let _ = events.send(ev).await;
    }
}

/// Worth sending the batch again elsewhere: the replica or its connection failed, not the
/// batch (a bad text is refused the same way everywhere).
fn resendable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::Unknown
            | Code::Internal
            | Code::Aborted
            | Code::Cancelled
    )
}

fn pause(failures: u32) -> Duration {
    (FIRST_PAUSE * 2u32.pow(failures.saturating_sub(1).min(6))).min(MAX_PAUSE)
}

fn handle(
    ev: Event,
    slots: &mut [Lane],
    pending: &mut VecDeque<Batch>,
    answered: &mut BTreeMap<u64, (Vec<Row>, pb::EmbedStreamResponse)>,
) -> anyhow::Result<()> {
    match ev {
        Event::Opened { lane, replica } => {
            tracing::debug!(lane, %replica, "embedding lane open");
            let s = &mut slots[lane];
            s.opening = false;
            s.failures = 0;
        }
        Event::Answer { lane, resp } => {
            let s = &mut slots[lane];
            let Some(b) = s.sent.pop_front() else {
                bail!("the embedder answered a batch that was never sent");
            };
            if resp.ids.len() != b.rows.len()
                || resp.ids.iter().zip(&b.rows).any(|(id, r)| *id != r.id)
            {
                bail!(
                    "the embedder answered out of order (expected id {})",
                    b.rows[0].id
                );
            }
            answered.insert(b.seq, (b.rows, resp));
        }
        Event::Draining { lane } => {
            tracing::info!(lane, "embedder replica draining: its lane moves elsewhere");
            slots[lane].tx = None;
            slots[lane].draining = true;
        }
        Event::Failed { lane, err, opened } => {
            if !resendable(err.code()) {
                return Err(err.into());
            }
            let s = &mut slots[lane];
            s.failures = if opened { 1 } else { s.failures + 1 };
            if s.failures >= ATTEMPTS {
                bail!("no embedder replica took the stream after {ATTEMPTS} tries: {err}");
            }
            let mut back: Vec<Batch> = s.sent.drain(..).collect();
            for b in back.iter_mut() {
                // A stream that never opened had nothing of the batch.
                if opened {
                    b.attempts += 1;
                }
                if b.attempts >= ATTEMPTS {
                    bail!(
                        "the batch from id {} failed on {ATTEMPTS} streams; last: {err}",
                        b.rows[0].id
                    );
                }
            }
            if opened {
                tracing::warn!(
                    lane,
                    batches = back.len(),
                    "an embedder stream broke ({err}); sending its batches again"
                );
            }
            give_back(pending, back);
            *s = Lane {
                failures: s.failures,
                ready_at: Some(Instant::now() + pause(s.failures)),
                ..Lane::default()
            };
        }
        Event::Closed { lane } => {
            let s = &mut slots[lane];
            // Batches it took but never sent (it was draining) go out on another lane; a
            // replica that ends a stream unasked without answering counts as a failure.
            let mut back: Vec<Batch> = s.sent.drain(..).collect();
            if !s.draining {
                for b in back.iter_mut() {
                    b.attempts += 1;
                    if b.attempts >= ATTEMPTS {
                        bail!(
                            "the embedder closed the stream without answering the batch from id {}",
                            b.rows[0].id
                        );
                    }
                }
            }
            give_back(pending, back);
            *s = Lane::default();
        }
    }
    Ok(())
}

/// Puts `back` into `pending` in input order, ahead of later batches.
fn give_back(pending: &mut VecDeque<Batch>, back: Vec<Batch>) {
    if back.is_empty() {
        return;
    }
    pending.extend(back);
    pending.make_contiguous().sort_by_key(|b| b.seq);
}

fn items(rows: &[Row]) -> Vec<pb::TextItem> {
    rows.iter()
        .map(|r| pb::TextItem {
            id: r.id.clone(),
            text: r.text.clone(),
        })
        .collect()
}
