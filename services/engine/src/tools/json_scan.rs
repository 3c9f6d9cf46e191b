//! What can be known of a tool call's JSON while the model is still writing it: the name once
//! its string closes, where the arguments start (so they can stream), where they and the
//! object end. Each call rescans its own text, a few hundred bytes, per token.

/// A call object so far.
#[derive(Debug, Default, PartialEq)]
pub(super) struct CallScan {
    pub name: Option<String>,
    /// Where the arguments value starts, and ends once complete (byte offsets).
    pub args: Option<(usize, Option<usize>)>,
    /// Just past the closing brace, once the object is complete.
    pub end: Option<usize>,
}

/// The text is not a call object (the model wrote something else).
#[derive(Debug, PartialEq)]
pub(super) struct Malformed;

/// Scans the object that starts at `at` (a `{`).
pub(super) fn object(text: &str, at: usize, args_key: &str) -> Result<CallScan, Malformed> {
    let b = text.as_bytes();
    if b.get(at) != Some(&b'{') {
        return Err(Malformed);
    }
    let mut scan = CallScan::default();
    let mut i = at + 1;
    loop {
        i = skip_ws(b, i);
        match b.get(i) {
            None => return Ok(scan),
            Some(b'}') => {
                scan.end = Some(i + 1);
                return Ok(scan);
            }
            Some(b',') => {
                i += 1;
                continue;
            }
            Some(b'"') => {}
            Some(_) => return Err(Malformed),
        }
        let Some(key_end) = string_end(b, i) else {
            return Ok(scan);
        };
        let key: String = serde_json::from_str(&text[i..key_end]).map_err(|_| Malformed)?;
        i = skip_ws(b, key_end);
        match b.get(i) {
            None => return Ok(scan),
            Some(b':') => {}
            Some(_) => return Err(Malformed),
        }
        i = skip_ws(b, i + 1);
        if i == b.len() {
            return Ok(scan);
        }
        let end = value_end(b, i)?;
        if key == args_key {
            scan.args = Some((i, end));
        }
        let Some(end) = end else {
            return Ok(scan);
        };
        if key == "name" {
            let name: String = serde_json::from_str(&text[i..end]).map_err(|_| Malformed)?;
            scan.name = Some(name);
        }
        i = end;
    }
}

/// Scans the array of call objects that starts at `at` (a `[`): the calls so far, and just
/// past the closing bracket once complete.
pub(super) fn array(
    text: &str,
    at: usize,
    args_key: &str,
) -> Result<(Vec<CallScan>, Option<usize>), Malformed> {
    let b = text.as_bytes();
    if b.get(at) != Some(&b'[') {
        return Err(Malformed);
    }
    let mut calls = Vec::new();
    let mut i = at + 1;
    loop {
        i = skip_ws(b, i);
        match b.get(i) {
            None => return Ok((calls, None)),
            Some(b']') => return Ok((calls, Some(i + 1))),
            Some(b',') => i += 1,
            Some(b'{') => {
                let call = object(text, i, args_key)?;
                let end = call.end;
                calls.push(call);
                match end {
                    Some(e) => i = e,
                    None => return Ok((calls, None)),
                }
            }
            Some(_) => return Err(Malformed),
        }
    }
}

pub(super) fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// Just past the closing quote of the string at `at`, if it is closed.
fn string_end(b: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// Just past the value at `at`, if it is complete; None while it is still being written.
fn value_end(b: &[u8], at: usize) -> Result<Option<usize>, Malformed> {
    match b[at] {
        b'"' => Ok(string_end(b, at)),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            while i < b.len() {
                match b[i] {
                    b'"' => match string_end(b, i) {
                        Some(e) => {
                            i = e;
                            continue;
                        }
                        None => return Ok(None),
                    },
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(Some(i + 1));
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            Ok(None)
        }
        b'}' | b']' | b',' | b':' => Err(Malformed),
        _ => {
            // A number, true, false or null: complete at the first delimiter after it.
            let end = (at..b.len())
                .find(|&i| matches!(b[i], b',' | b'}' | b']') || b[i].is_ascii_whitespace());
            Ok(end)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_known_as_it_forms() {
        let full =
            r#"{"name": "get_time", "arguments": {"tz": "Europe/Paris", "n": [1, {"a": "}"}]}}"#;
        let args_at = full.find("{\"tz").unwrap();
        let mut seen_name_at = None;
        for cut in 1..=full.len() {
            let s = object(&full[..cut], 0, "arguments").unwrap();
            if s.name.is_some() && seen_name_at.is_none() {
                seen_name_at = Some(cut);
            }
            if let Some((a, end)) = s.args {
                assert_eq!(a, args_at);
                if cut < full.len() - 1 {
                    assert_eq!(end, None, "cut {cut}");
                }
            }
        }
        assert_eq!(seen_name_at, Some(full.find(", \"arguments").unwrap()));
        let done = object(full, 0, "arguments").unwrap();
        assert_eq!(done.name.as_deref(), Some("get_time"));
        assert_eq!(done.args, Some((args_at, Some(full.len() - 1))));
        assert_eq!(done.end, Some(full.len()));
    }

    #[test]
    fn arrays_of_calls_and_bad_text() {
        let t = r#"[{"name":"a","arguments":{}}, {"name":"b","arguments":{"x":1}}]"#;
        let (calls, end) = array(t, 0, "arguments").unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].name.as_deref(), Some("b"));
        assert_eq!(end, Some(t.len()));
        let (calls, end) = array(&t[..20], 0, "arguments").unwrap();
        assert_eq!((calls.len(), end), (1, None));
        assert_eq!(object("{name: 1}", 0, "arguments"), Err(Malformed));
        assert_eq!(object("{\"a\" 1}", 0, "arguments"), Err(Malformed));
        let scalar = object(r#"{"arguments": 12"#, 0, "arguments").unwrap();
        assert_eq!(scalar.args, Some((14, None)));
    }
}
