//! Input rows for `llama-cli embed`: .txt (one text per line, the line number as id) or
//! .jsonl (the chosen fields), from a file or stdin. A line that is not UTF-8 or not a JSON
//! object with a string text is reported with its number, never altered.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Txt,
    Jsonl,
}

/// Where the texts come from: the options `llama-cli embed` and `llama-cli rerank` share.
#[derive(clap::Args, Debug)]
pub struct InputArgs {
    /// Texts (documents for rerank): a .txt file (one per line), a .jsonl file, or `-` for stdin.
    #[arg(long)]
    pub input: PathBuf,
    /// JSON field holding the text (.jsonl).
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// JSON field holding the id (.jsonl; the line number when absent).
    #[arg(long, default_value = "id")]
    pub id_field: String,
    /// Input format when the extension does not tell (stdin is txt unless told).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Stop at the first bad line instead of reporting and skipping it.
    #[arg(long)]
    pub strict: bool,
}

impl InputArgs {
    pub fn is_stdin(&self) -> bool {
        self.input.as_os_str() == "-"
    }

    pub fn open(&self) -> anyhow::Result<Input> {
        Input::open(&self.input, self.format, &self.text_field, &self.id_field)
    }
}

#[derive(Clone, Debug)]
pub struct Row {
    /// 1-based line number in the input.
    pub line: u64,
    pub id: String,
    pub text: String,
}

pub enum Item {
    Row(Row),
    Bad { line: u64, reason: String },
}

pub struct Input {
    reader: Box<dyn BufRead + Send>,
    format: Format,
    text_field: String,
    id_field: String,
    line: u64,
    /// Bytes read so far (for progress against the file size).
    pub bytes: u64,
    buf: Vec<u8>,
}

impl Input {
    /// `-` is stdin (txt unless `format` says otherwise); otherwise the extension decides.
    pub fn open(
        path: &Path,
        format: Option<Format>,
        text_field: &str,
        id_field: &str,
    ) -> anyhow::Result<Self> {
        let stdin = path.as_os_str() == "-";
        let format = match format {
            Some(f) => f,
            None if stdin => Format::Txt,
            None => match path.extension().and_then(|e| e.to_str()) {
                Some("jsonl") | Some("ndjson") => Format::Jsonl,
                Some("txt") | None => Format::Txt,
                Some(other) => anyhow::bail!(
                    "cannot tell the format of '{}' from '.{other}'; give --format txt or jsonl",
                    path.display()
                ),
            },
        };
        let reader: Box<dyn Read + Send> = if stdin {
            Box::new(std::io::stdin())
        } else {
            Box::new(File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?)
        };
        Ok(Self {
            reader: Box::new(BufReader::with_capacity(1 << 16, reader)),
            format,
            text_field: text_field.to_string(),
            id_field: id_field.to_string(),
            line: 0,
            bytes: 0,
            buf: Vec::new(),
        })
    }

    /// Reads the next line into `buf` without its line ending; false at the end.
    fn next_line(&mut self) -> std::io::Result<bool> {
        self.buf.clear();
        let n = self.reader.read_until(b'\n', &mut self.buf)?;
        if n == 0 {
            return Ok(false);
        }
        self.bytes += n as u64;
        self.line += 1;
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
        }
        Ok(true)
    }

    /// Skips `n` lines (resuming after rows already in the output).
    pub fn skip(&mut self, n: u64) -> std::io::Result<u64> {
        while self.line < n {
            if !self.next_line()? {
                break;
            }
        }
        Ok(self.line)
    }

    pub fn next_item(&mut self) -> std::io::Result<Option<Item>> {
        if !self.next_line()? {
            return Ok(None);
        }
        let line = self.line;
        let text = match std::str::from_utf8(&self.buf) {
            Ok(t) => t,
            Err(e) => {
                return Ok(Some(Item::Bad {
                    line,
                    reason: format!("not valid UTF-8 (byte {})", e.valid_up_to()),
                }))
            }
        };
        Ok(Some(match self.format {
            Format::Txt => Item::Row(Row {
                line,
                id: line.to_string(),
                text: text.to_string(),
            }),
            Format::Jsonl => match self.json_row(line, text) {
                Ok(row) => Item::Row(row),
                Err(reason) => Item::Bad { line, reason },
            },
        }))
    }

    fn json_row(&self, line: u64, text: &str) -> Result<Row, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
        let obj = v.as_object().ok_or("not a JSON object")?;
        let text = match obj.get(&self.text_field) {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(format!("field '{}' is not a string", self.text_field)),
            None => return Err(format!("no field '{}'", self.text_field)),
        };
        let id = match obj.get(&self.id_field) {
            None | Some(Value::Null) => line.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(v @ Value::Number(_)) => v.to_string(),
            Some(_) => {
                return Err(format!(
                    "field '{}' is not a string or number",
                    self.id_field
                ))
            }
        };
        Ok(Row { line, id, text })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (line, id, text) of a row, or (line, reason) of a bad line.
    type Parsed = Result<(u64, String, String), (u64, String)>;

    fn items(data: &[u8], format: Format) -> Vec<Parsed> {
        let mut input = Input {
            reader: Box::new(std::io::Cursor::new(data.to_vec())),
            format,
            text_field: "text".into(),
            id_field: "id".into(),
            line: 0,
            bytes: 0,
            buf: Vec::new(),
        };
        let mut out = Vec::new();
        while let Some(item) = input.next_item().unwrap() {
            out.push(match item {
                Item::Row(r) => Ok((r.line, r.id, r.text)),
                Item::Bad { line, reason } => Err((line, reason)),
            });
        }
        out
    }

    #[test]
    fn text_lines_keep_their_numbers_and_bad_bytes_are_reported() {
        let got = items(b"one\r\n\ntwo \xff\nthree", Format::Txt);
        assert_eq!(got[0], Ok((1, "1".into(), "one".into())));
        assert_eq!(got[1], Ok((2, "2".into(), String::new())));
        assert!(matches!(&got[2], Err((3, r)) if r.contains("UTF-8")));
        assert_eq!(got[3], Ok((4, "4".into(), "three".into())));
    }

    #[test]
    fn json_lines_take_the_fields() {
        let got = items(
            b"{\"id\":\"a\",\"text\":\"x\"}\n{\"id\":7,\"text\":\"y\"}\n{\"text\":\"z\"}\nnot json\n{\"text\":3}\n",
            Format::Jsonl,
        );
        assert_eq!(got[0], Ok((1, "a".into(), "x".into())));
        assert_eq!(got[1], Ok((2, "7".into(), "y".into())));
        assert_eq!(got[2], Ok((3, "3".into(), "z".into())));
        assert!(matches!(&got[3], Err((4, r)) if r.contains("JSON")));
        assert!(matches!(&got[4], Err((5, r)) if r.contains("not a string")));
    }
}
