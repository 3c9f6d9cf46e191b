//! Reads tool calls out of what the model writes, as it writes it: text before a call goes
//! out as text (less any possible start of the format's opener, held until it is decided),
//! a call goes out as a header (id, name) once its name is written, then its arguments as
//! they form. Text never carries call syntax.

use rand::distr::{Alphanumeric, SampleString};

use super::json_scan::{self, CallScan, Malformed};
use super::ToolFormat;

/// A whole call, as the final message reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// A JSON object, as text.
    pub arguments: String,
}

/// Part of a call: the first of a call has its id and name, later ones more arguments.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCallDelta {
    pub index: u32,
    pub id: String,
    pub name: String,
    pub arguments: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ToolOutput {
    Text(String),
    Call(ToolCallDelta),
}

/// Llama 3.x marks code-interpreter calls with this token; a JSON call may follow it.
const PYTHON_TAG: &str = "<|python_tag|>";

pub struct ToolParser {
    format: ToolFormat,
    /// Text not yet decided (a possible opener), or the calls' text being written.
    buf: String,
    in_calls: bool,
    /// Whether anything but white space went out as text (Llama 3's calls are whole answers).
    wrote_text: bool,
    calls: Vec<Pending>,
    /// Calls of finished call blocks (their indices come before those of `calls`).
    done: Vec<ToolCall>,
}

struct Pending {
    id: String,
    name: Option<String>,
    /// Bytes of the arguments already sent.
    args_sent: usize,
    header_sent: bool,
}

impl ToolParser {
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            buf: String::new(),
            in_calls: false,
            wrote_text: false,
            calls: Vec::new(),
            done: Vec::new(),
        }
    }

    /// Whether what the model writes now is call syntax (the generic format's answer is JSON
    /// from the first token).
    pub fn in_call(&self) -> bool {
        self.in_calls || self.format == ToolFormat::Generic
    }

    pub fn push(&mut self, text: &str) -> Vec<ToolOutput> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        if self.format == ToolFormat::Generic {
            // The whole answer is one JSON value, read when it is complete.
            return out;
        }
        loop {
            let progressed = if self.in_calls {
                self.calls_step(&mut out)
            } else {
                self.text_step(&mut out)
            };
            if !progressed {
                return out;
            }
        }
    }

    /// Decides what text can go out; true when a call block starts.
    fn text_step(&mut self, out: &mut Vec<ToolOutput>) -> bool {
        let called = !self.done.is_empty();
        let opener = match self.format {
            ToolFormat::Llama3 => {
                if self.wrote_text {
                    let all = std::mem::take(&mut self.buf);
                    self.emit_text(all, out);
                    return false;
                }
                let t = self
                    .buf
                    .trim_start_matches(|c: char| c.is_whitespace() || (called && c == ';'));
                let t = t.strip_prefix(PYTHON_TAG).unwrap_or(t);
                if t.starts_with('{') {
                    self.buf = t.to_string();
                    self.in_calls = true;
                    return true;
                }
                // White space, or what may still become the tag: undecided.
                if PYTHON_TAG.starts_with(t) {
                    return false;
                }
                let all = std::mem::take(&mut self.buf);
                self.emit_text(all, out);
                return false;
            }
            f => f.opener().unwrap_or_default(),
        };
        if let Some(at) = self.buf.find(opener) {
            let before = self.buf[..at].to_string();
            self.emit_text(before, out);
            self.buf.drain(..at + opener.len());
            self.in_calls = true;
            return true;
        }
        let hold = held_prefix(&self.buf, opener);
        let ready = self.buf[..self.buf.len() - hold].to_string();
        self.buf.drain(..ready.len());
        self.emit_text(ready, out);
        false
    }

    /// Text after calls is white space between blocks: it goes out only if it says something.
    fn emit_text(&mut self, text: String, out: &mut Vec<ToolOutput>) {
        if text.is_empty() || (!self.done.is_empty() && text.trim().is_empty()) {
            return;
        }
        if !text.trim().is_empty() {
            self.wrote_text = true;
        }
        out.push(ToolOutput::Text(text));
    }

    /// Scans the call block being written; true when it ended and text follows.
    fn calls_step(&mut self, out: &mut Vec<ToolOutput>) -> bool {
        let b = self.buf.as_bytes();
        let at = json_scan::skip_ws(b, 0);
        if at == b.len() {
            return false;
        }
        let key = self.format.arguments_key();
        let scanned = match (self.format, b[at]) {
            (ToolFormat::Mistral, b'[') => json_scan::array(&self.buf, at, key),
            (ToolFormat::Hermes | ToolFormat::Llama3, b'{') => {
                json_scan::object(&self.buf, at, key).map(|c| {
                    let end = c.end;
                    (vec![c], end)
                })
            }
            _ => Err(Malformed),
        };
        let Ok((scans, end)) = scanned else {
            // Not a call after all: what was held goes out as the text it is.
            let opener = self.format.opener().unwrap_or_default();
            let text = format!("{opener}{}", std::mem::take(&mut self.buf));
            self.in_calls = false;
            self.emit_text(text, out);
            return false;
        };
        for (k, scan) in scans.iter().enumerate() {
            self.stream_call(k, scan, out);
        }
        let Some(end) = end else {
            return false;
        };
        let mut rest = end;
        if self.format == ToolFormat::Hermes {
            const CLOSER: &str = "</tool_call>";
            let after = json_scan::skip_ws(self.buf.as_bytes(), end);
            let tail = &self.buf[after..];
            if tail.starts_with(CLOSER) {
                rest = after + CLOSER.len();
            } else if CLOSER.starts_with(tail) {
                // The closer may still be coming.
                return false;
            }
        }
        let text = self.buf.clone();
        for (scan, pending) in scans.iter().zip(std::mem::take(&mut self.calls)) {
            if let Some(call) = whole(&text, scan, pending) {
                self.done.push(call);
            }
        }
        self.buf.drain(..rest);
        self.in_calls = false;
        true
    }

    /// Sends what is new of call `k` of the block being written.
    fn stream_call(&mut self, k: usize, scan: &CallScan, out: &mut Vec<ToolOutput>) {
        while self.calls.len() <= k {
            self.calls.push(Pending {
                id: new_id(self.format),
                name: None,
                args_sent: 0,
                header_sent: false,
            });
        }
        let index = (self.done.len() + k) as u32;
        let p = &mut self.calls[k];
        let Some(name) = &scan.name else {
            return;
        };
        if !p.header_sent {
            p.header_sent = true;
            p.name = Some(name.clone());
            out.push(ToolOutput::Call(ToolCallDelta {
                index,
                id: p.id.clone(),
                name: name.clone(),
                arguments: String::new(),
            }));
        }
        let Some((start, end)) = scan.args else {
            return;
        };
        // Arguments written as a JSON string (some models quote them) go out decoded, whole.
        if self.buf[start..].starts_with('"') {
            if let (Some(end), 0) = (end, p.args_sent) {
                let decoded: String =
                    serde_json::from_str(&self.buf[start..end]).unwrap_or_default();
                p.args_sent = end - start;
                out.push(delta(index, decoded));
            }
            return;
        }
        let upto = end.unwrap_or(self.buf.len());
        if upto > start + p.args_sent {
            let piece = self.buf[start + p.args_sent..upto].to_string();
            p.args_sent = upto - start;
            out.push(delta(index, piece));
        }
    }

    /// Ends the answer: text still held goes out; the generic format's JSON is read. Returns
    /// what goes out and the whole calls (a call cut off by the token limit is not one).
    pub fn finish(mut self) -> (Vec<ToolOutput>, Vec<ToolCall>) {
        let mut out = Vec::new();
        if self.format == ToolFormat::Generic {
            self.finish_generic(&mut out);
        } else if !self.in_calls {
            let rest = std::mem::take(&mut self.buf);
            self.emit_text(rest, &mut out);
        }
        (out, self.done)
    }

    fn finish_generic(&mut self, out: &mut Vec<ToolOutput>) {
        let text = std::mem::take(&mut self.buf);
        let value: serde_json::Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(_) => return self.emit_text(text, out),
        };
        if let Some(reply) = value.get("response").and_then(|r| r.as_str()) {
            return self.emit_text(reply.to_string(), out);
        }
        let calls = match (value.get("tool_calls"), value.get("tool_call")) {
            (Some(serde_json::Value::Array(calls)), _) => calls.clone(),
            (_, Some(call)) => vec![call.clone()],
            _ => return self.emit_text(text, out),
        };
        for call in calls {
            let (Some(name), Some(args)) = (
                call.get("name").and_then(|n| n.as_str()),
                call.get("arguments"),
            ) else {
                continue;
            };
            let call = ToolCall {
                id: new_id(self.format),
                name: name.to_string(),
                arguments: args.to_string(),
            };
            let index = self.done.len() as u32;
            out.push(ToolOutput::Call(ToolCallDelta {
                index,
                id: call.id.clone(),
                name: call.name.clone(),
                arguments: String::new(),
            }));
            out.push(delta(index, call.arguments.clone()));
            self.done.push(call);
        }
    }
}

fn delta(index: u32, arguments: String) -> ToolOutput {
    ToolOutput::Call(ToolCallDelta {
        index,
        id: String::new(),
        name: String::new(),
        arguments,
    })
}

/// A finished call object: its name and arguments (an object; `{}` when it has none).
fn whole(text: &str, scan: &CallScan, pending: Pending) -> Option<ToolCall> {
    let name = scan.name.clone()?;
    let arguments = match scan.args {
        Some((start, Some(end))) if text[start..].starts_with('"') => {
            serde_json::from_str::<String>(&text[start..end]).ok()?
        }
        Some((start, Some(end))) => text[start..end].trim().to_string(),
        _ => "{}".to_string(),
    };
    Some(ToolCall {
        id: pending.id,
        name,
        arguments,
    })
}

/// Mistral's templates want 9 letters or digits; OpenAI's ids look like `call_` + 24.
fn new_id(format: ToolFormat) -> String {
    let mut rng = rand::rng();
    match format {
        ToolFormat::Mistral => Alphanumeric.sample_string(&mut rng, 9),
        _ => format!("call_{}", Alphanumeric.sample_string(&mut rng, 24)),
    }
}

/// The longest end of `text` that `opener` starts with (held back until it is decided).
fn held_prefix(text: &str, opener: &str) -> usize {
    (1..opener.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && opener.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` in pieces of `step` bytes (at char boundaries) and gathers the output.
    fn run(format: ToolFormat, text: &str, step: usize) -> (String, Vec<ToolCall>, Vec<String>) {
        let mut p = ToolParser::new(format);
        let mut out = Vec::new();
        let mut i = 0;
        while i < text.len() {
            let mut j = (i + step).min(text.len());
            while !text.is_char_boundary(j) {
                j += 1;
            }
            out.extend(p.push(&text[i..j]));
            i = j;
        }
        let (rest, calls) = p.finish();
        out.extend(rest);
        let mut prose = String::new();
        let mut streamed: Vec<(String, String)> = Vec::new();
        for o in out {
            match o {
                ToolOutput::Text(t) => prose.push_str(&t),
                ToolOutput::Call(d) => {
                    let i = d.index as usize;
                    if streamed.len() <= i {
                        assert!(!d.name.is_empty(), "a call's first delta names it");
                        streamed.push((d.name.clone(), String::new()));
                    }
                    streamed[i].1.push_str(&d.arguments);
                }
            }
        }
        let args: Vec<String> = streamed.iter().map(|(_, a)| a.clone()).collect();
        for (c, (name, a)) in calls.iter().zip(&streamed) {
            assert_eq!(&c.name, name);
            assert_eq!(&c.arguments, a.trim(), "streamed arguments are the call's");
        }
        (prose, calls, args)
    }

    #[test]
    fn hermes_calls_stream_in_any_pieces() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"timezone\": \"Europe/Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>";
        for step in [1, 2, 3, 7, 1000] {
            let (prose, calls, _) = run(ToolFormat::Hermes, text, step);
            assert_eq!(prose, "Let me check.\n", "step {step}");
            assert_eq!(calls.len(), 2);
            assert_eq!(calls[0].name, "get_time");
            assert_eq!(calls[0].arguments, r#"{"timezone": "Europe/Paris"}"#);
            assert_eq!(calls[1].arguments, r#"{"a": 1, "b": 2}"#);
            assert!(calls[0].id.starts_with("call_") && calls[0].id != calls[1].id);
        }
    }

    #[test]
    fn text_that_only_looks_like_an_opener_is_text() {
        let (prose, calls, _) = run(ToolFormat::Hermes, "a <tool_ b <tool_call> not json", 1);
        assert_eq!(prose, "a <tool_ b <tool_call> not json");
        assert!(calls.is_empty());
        let (prose, calls, _) = run(ToolFormat::Hermes, "plain answer <tool", 2);
        assert_eq!((prose.as_str(), calls.len()), ("plain answer <tool", 0));
    }

    #[test]
    fn mistral_llama3_and_generic() {
        let m = "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"x\": [1, 2]}, \"id\": \"abcdefghi\"}, {\"name\": \"g\", \"arguments\": {}}]";
        let (prose, calls, _) = run(ToolFormat::Mistral, m, 3);
        assert_eq!(prose, "");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].arguments, r#"{"x": [1, 2]}"#);
        assert_eq!(calls[0].id.len(), 9);

        let l = " {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}";
        let (prose, calls, _) = run(ToolFormat::Llama3, l, 2);
        assert_eq!(
            (prose.as_str(), calls[0].name.as_str()),
            ("", "get_weather")
        );
        assert_eq!(calls[0].arguments, r#"{"city": "Oslo"}"#);
        let (prose, calls, _) = run(ToolFormat::Llama3, "It is {warm} today.", 2);
        assert_eq!((prose.as_str(), calls.len()), ("It is {warm} today.", 0));

        let g = r#"{"tool_calls": [{"name": "f", "arguments": {"q": "x"}}]}"#;
        let (prose, calls, _) = run(ToolFormat::Generic, g, 5);
        assert_eq!(
            (prose.as_str(), calls[0].arguments.as_str()),
            ("", r#"{"q":"x"}"#)
        );
        let (prose, calls, _) = run(ToolFormat::Generic, r#"{"response": "hi \"you\""}"#, 5);
        assert_eq!((prose.as_str(), calls.len()), ("hi \"you\"", 0));
    }

    #[test]
    fn a_call_cut_off_is_not_a_call() {
        let (prose, calls, args) = run(
            ToolFormat::Hermes,
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": ",
            4,
        );
        assert_eq!((prose.as_str(), calls.len()), ("", 0));
        assert_eq!(args, vec!["{\"a\": ".to_string()]);
    }
}
