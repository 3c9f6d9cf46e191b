//! What tests of the HTTP sides share: curl as the client, OpenAI-shaped errors, and reading
//! `/metrics`.

use std::process::Command;

use serde_json::Value;

use crate::support::ServiceProcess;

/// curl: the HTTP status and the parsed body.
pub fn curl(method: &str, url: &str, auth: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-X", method, "-w", "\n%{http_code}", url]);
    if let Some(token) = auth {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = cmd.output().expect("curl");
    assert!(out.status.success(), "curl: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    let value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (code.parse().unwrap(), value)
}

/// An error body in OpenAI's shape, with the status and type expected.
pub fn assert_error(got: &(u16, Value), status: u16, kind: &str, what: &str) {
    let (code, body) = got;
    assert_eq!(*code, status, "{what}: {body}");
    let e = &body["error"];
    assert_eq!(e["type"], kind, "{what}: {body}");
    let message = e["message"].as_str().unwrap_or_default();
    assert!(
        !message.is_empty() && message.len() < 400,
        "{what}: {message}"
    );
}

/// `/metrics` of a service started with `--metrics-listen`.
pub fn scrape(p: &ServiceProcess) -> String {
    let addr = p.metrics.expect("started with --metrics-listen");
    let out = Command::new("curl")
        .args(["-sf", &format!("http://{addr}/metrics")])
        .output()
        .unwrap();
    assert!(out.status.success(), "scraping {addr}");
    String::from_utf8(out.stdout).unwrap()
}

/// The value of the sample whose name and labels start with `prefix` (0 when absent).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
