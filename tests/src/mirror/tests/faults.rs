use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::header::RANGE;

use super::*;
use crate::mirror::{Fault, FaultScope};

/// Reads a body until it ends or breaks: (bytes received, whether it broke).
async fn drain(r: reqwest::Response) -> (Vec<u8>, bool) {
    let mut body = r.bytes_stream();
    let mut got = Vec::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => got.extend_from_slice(&c),
            Err(_) => return (got, true),
        }
    }
    (got, false)
}

#[tokio::test]
async fn drop_after_truncates_then_a_range_resumes() {
    let m = mirror().await;
    m.set_faults(
        FaultScope::file(MODEL),
        Fault::drop_after(1_500_000).times(1),
    );
    let client = reqwest::Client::new();
    let first = client.get(url(&m, "main", MODEL)).send().await.unwrap();
    assert_eq!(header(&first, "content-length"), MODEL_LEN.to_string());
    let (head, broke) = drain(first).await;
    assert!(broke, "the client must see an incomplete body");
    assert_eq!(head.len(), 1_500_000);

    let resumed = client
        .get(url(&m, "main", MODEL))
        .header(RANGE, format!("bytes={}-", head.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 206);
    let (tail, broke) = drain(resumed).await;
    assert!(!broke, "the fault was for one response only");
    assert_eq!([head, tail].concat(), model_bytes());
    let s = m.file_stats(MODEL);
    assert_eq!((s.full_gets, s.range_gets), (1, 1));
    assert_eq!(s.ranges, ["bytes=1500000-"]);
}

#[tokio::test]
async fn drop_after_zero_sends_headers_only() {
    let m = mirror().await;
    m.set_faults(FaultScope::All, Fault::drop_after(0));
    let r = reqwest::get(url(&m, "main", OTHER)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(drain(r).await, (Vec::new(), true));
}

#[tokio::test]
async fn corrupt_keeps_the_length_but_not_the_hash() {
    let m = mirror().await;
    m.set_faults(FaultScope::All, Fault::corrupt().times(1));
    let bad = reqwest::get(url(&m, "main", MODEL)).await.unwrap();
    let bad = bad.bytes().await.unwrap();
    assert_eq!(bad.len(), MODEL_LEN);
    assert_ne!(sha256(&bad), sha256(&model_bytes()));
    let good = reqwest::get(url(&m, "main", MODEL)).await.unwrap();
    assert_eq!(good.bytes().await.unwrap(), model_bytes());
}

#[tokio::test]
async fn fail_status_is_answered_instead_and_lifts() {
    let m = mirror().await;
    m.set_faults(FaultScope::file(MODEL), Fault::status(503).times(2));
    let get = || reqwest::get(url(&m, "main", MODEL));
    assert_eq!(get().await.unwrap().status(), 503);
    // A HEAD sees the fault but does not use it up.
    let head = reqwest::Client::new().head(url(&m, "main", MODEL)).send();
    assert_eq!(head.await.unwrap().status(), 503);
    assert_eq!(get().await.unwrap().status(), 503);
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(m.file_stats(MODEL).full_gets, 3);
}

#[tokio::test]
async fn file_scope_leaves_other_files_alone() {
    let m = mirror().await;
    m.set_faults(FaultScope::file(MODEL), Fault::status(500));
    let other = reqwest::get(url(&m, "main", OTHER)).await.unwrap();
    assert_eq!(other.bytes().await.unwrap().as_ref(), b"small second file");
    m.clear_faults();
    assert_eq!(
        reqwest::get(url(&m, "main", MODEL)).await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn throttle_paces_the_body() {
    let m = mirror().await;
    // 40 KB at 200 KB/s: about 0.2 s.
    m.set_faults(FaultScope::All, Fault::throttle(200_000));
    let began = Instant::now();
    let r = reqwest::Client::new()
        .get(url(&m, "main", MODEL))
        .header(RANGE, "bytes=0-39999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), model_bytes()[..40_000]);
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(150), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn reset_stats_zeroes_counters() {
    let m = mirror().await;
    reqwest::get(url(&m, "main", OTHER)).await.unwrap();
    assert_eq!(m.file_stats(OTHER).full_gets, 1);
    m.reset_stats();
    assert_eq!(m.stats(), Default::default());
}

#[tokio::test]
async fn ignore_range_answers_the_whole_file() {
    let m = mirror().await;
    m.set_faults(FaultScope::file(MODEL), Fault::ignore_range().times(1));
    let client = reqwest::Client::new();
    let get = || {
        client
            .get(url(&m, "main", MODEL))
            .header(RANGE, "bytes=100-199")
            .send()
    };
    let whole = get().await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(drain(whole).await, (model_bytes(), false));
    let ranged = get().await.unwrap();
    assert_eq!(ranged.status(), 206, "the fault was for one response only");
    assert_eq!(drain(ranged).await.0, model_bytes()[100..200]);
    let s = m.file_stats(MODEL);
    assert_eq!(s.ranges, ["bytes=100-199", "bytes=100-199"]);
}

#[tokio::test]
async fn bodies_in_flight_are_counted_with_their_peak() {
    // Both bodies stall after their first bytes: a whole body can otherwise fit in the
    // loopback socket buffers and end before the other request is even answered.
    let m = mirror().await;
    m.set_faults(FaultScope::file(MODEL), Fault::stall_after(1000));
    let client = reqwest::Client::new();
    let (a, b) = tokio::join!(
        client.get(url(&m, "main", MODEL)).send(),
        client.get(url(&m, "main", MODEL)).send()
    );
    let (mut a, mut b) = (a.unwrap(), b.unwrap());
    for r in [&mut a, &mut b] {
        let mut got = 0;
        while got < 1000 {
            got += r
                .chunk()
                .await
                .unwrap()
                .expect("the body stalls, not ends")
                .len();
        }
    }
    let s = m.file_stats(MODEL);
    assert_eq!((s.in_flight, s.peak_in_flight), (2, 2));
}
