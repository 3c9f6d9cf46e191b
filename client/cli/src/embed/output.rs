//! The Parquet file `llama-cli embed` writes, one row group at a time. After each row group
//! the progress file `<out>.progress` records how far the file is complete and the footer
//! that would close it there: `--resume` cuts an interrupted file to that point, closes it
//! with that footer, copies its rows into a fresh file and carries on after them.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, Int32Array, RecordBatch, StringArray,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use md5::Digest;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{
    encode_arrow_schema, ArrowSchemaConverter, ArrowWriter, ARROW_SCHEMA_META_KEY,
};
use parquet::basic::Compression;
use parquet::file::metadata::{FileMetaData, KeyValue, ParquetMetaData, ParquetMetaDataWriter};
use parquet::file::properties::WriterProperties;
use serde_json::{json, Value};

use super::input::Row;

/// BufWriter capacity inside the parquet writer: writing this many padding bytes after a row
/// group pushes every byte of it to the file (readers skip bytes between row groups).
const PUSH_THROUGH: usize = 8192;

/// What the file says about itself, in its key-value metadata.
pub struct FileMeta {
    pub model: String,
    pub model_md5: String,
    pub pooling: String,
    pub normalized: bool,
    pub dim: usize,
}

/// What must match for `--resume` to continue a file.
#[derive(Clone, Debug, PartialEq)]
pub struct RunIdentity {
    pub input: String,
    pub input_len: u64,
    /// Every option that changes what a row holds.
    pub settings: String,
}

pub struct Checkpoint {
    pub identity: RunIdentity,
    pub model_md5: String,
    pub rows: u64,
    /// Input lines consumed by the rows in complete row groups.
    pub lines: u64,
    file_len: u64,
    footer: Vec<u8>,
}

impl FileMeta {
    /// The metadata of a file this command wrote (to finish a resumed run with no rows left).
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?;
        let kv = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .cloned()
            .unwrap_or_default();
        let get = |k: &str| {
            kv.iter()
                .find(|e| e.key == k)
                .and_then(|e| e.value.clone())
                .unwrap_or_default()
        };
        let dim = match builder.schema().field_with_name("embedding")?.data_type() {
            DataType::FixedSizeList(_, d) => *d as usize,
            other => bail!("{}: embedding column is {other}", path.display()),
        };
        Ok(Self {
            model: get("model"),
            model_md5: get("model_md5"),
            pooling: get("pooling"),
            normalized: get("normalized") == "true",
            dim,
        })
    }
}

/// True when `path` ends with Parquet's closing magic: a file some run finished.
pub fn is_complete(path: &Path) -> bool {
    use std::io::Read;
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    let mut tail = [0u8; 4];
    f.seek(SeekFrom::End(-4)).is_ok() && f.read_exact(&mut tail).is_ok() && &tail == b"PAR1"
}

pub fn progress_path(out: &Path) -> PathBuf {
    suffixed(out, ".progress")
}

pub fn prev_path(out: &Path) -> PathBuf {
    suffixed(out, ".prev")
}

fn suffixed(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl Checkpoint {
    pub fn read(out: &Path) -> anyhow::Result<Option<Self>> {
        let path = progress_path(out);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| path.display().to_string()),
        };
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is corrupt", path.display()))?;
        let s = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .with_context(|| format!("{}: no '{k}'", path.display()))
        };
        let n = |k: &str| {
            v[k].as_u64()
                .with_context(|| format!("{}: no '{k}'", path.display()))
        };
        Ok(Some(Self {
            identity: RunIdentity {
                input: s("input")?,
                input_len: n("input_len")?,
                settings: s("settings")?,
            },
            model_md5: s("model_md5")?,
            rows: n("rows")?,
            lines: n("lines")?,
            file_len: n("file_len")?,
            footer: hex::decode(s("footer")?)
                .with_context(|| format!("{}: bad footer", path.display()))?,
        }))
    }

    fn write(&self, out: &Path) -> anyhow::Result<()> {
        let v = json!({
            "input": self.identity.input, "input_len": self.identity.input_len,
            "settings": self.identity.settings, "model_md5": self.model_md5,
            "rows": self.rows, "lines": self.lines, "file_len": self.file_len,
            "footer": hex::encode(&self.footer),
        });
        let path = progress_path(out);
        let tmp = suffixed(&path, ".tmp");
        std::fs::write(&tmp, v.to_string())?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Makes the interrupted file whole up to this checkpoint and moves it aside; its rows
    /// are then copied by [`Output::copy_rows`]. A resume interrupted while copying finds the
    /// moved file already whole.
    pub fn recover(&self, out: &Path) -> anyhow::Result<PathBuf> {
        let prev = prev_path(out);
        if prev.exists() {
            return Ok(prev);
        }
        let mut f = OpenOptions::new()
            .write(true)
            .open(out)
            .with_context(|| format!("{} (to resume)", out.display()))?;
        let len = f.metadata()?.len();
        if len < self.file_len {
            bail!(
                "{} is shorter ({len} bytes) than its progress file says ({}); start again without --resume",
                out.display(),
                self.file_len
            );
        }
        f.set_len(self.file_len)?;
        f.seek(SeekFrom::End(0))?;
        f.write_all(&self.footer)?;
        f.sync_all()?;
        std::fs::rename(out, &prev)?;
        Ok(prev)
    }
}

pub struct Output {
    path: PathBuf,
    writer: ArrowWriter<File>,
    schema: SchemaRef,
    kv: Vec<KeyValue>,
    with_text: bool,
    group_rows: usize,
    identity: RunIdentity,
    model_md5: String,
    rows: u64,
    lines: u64,
}

impl Output {
    pub fn create(
        path: &Path,
        meta: &FileMeta,
        with_text: bool,
        group_rows: usize,
        identity: RunIdentity,
    ) -> anyhow::Result<Self> {
        let mut fields = vec![Field::new("id", DataType::Utf8, false)];
        if with_text {
            fields.push(Field::new("text", DataType::Utf8, false));
        }
        // MD5 of the text's UTF-8 bytes, lowercase hex: for de-duplication and joins, also
        // when the text itself is left out.
        fields.push(Field::new("text_md5", DataType::Utf8, false));
        fields.push(Field::new(
            "embedding",
            DataType::FixedSizeList(
                Arc::new(Field::new("item", DataType::Float32, false)),
                meta.dim as i32,
            ),
            false,
        ));
        fields.push(Field::new("n_tokens", DataType::Int32, false));
        fields.push(Field::new("truncated", DataType::Boolean, false));
        let schema = Arc::new(Schema::new(fields));
        let kv = vec![
            KeyValue::new("model".into(), meta.model.clone()),
            KeyValue::new("model_md5".into(), meta.model_md5.clone()),
            KeyValue::new("pooling".into(), meta.pooling.clone()),
            KeyValue::new("normalized".into(), meta.normalized.to_string()),
            KeyValue::new("created_at".into(), rfc3339_now()),
            KeyValue::new(
                "tool_version".into(),
                format!("llama-cli {}", env!("CARGO_PKG_VERSION")),
            ),
        ];
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            // Row groups end when this writer says so (every `group_rows` rows).
            .set_max_row_group_row_count(None)
            .set_key_value_metadata(Some(kv.clone()))
            .build();
        let file = File::create(path).with_context(|| path.display().to_string())?;
        let writer = ArrowWriter::try_new(file, Arc::clone(&schema), Some(props))?;
        let out = Self {
            path: path.to_path_buf(),
            writer,
            schema,
            kv,
            with_text,
            group_rows: group_rows.max(1),
            identity,
            model_md5: meta.model_md5.clone(),
            rows: 0,
            lines: 0,
        };
        // From here on an interrupted run leaves a progress file (with no rows yet).
        out.record()?;
        Ok(out)
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Adds rows with their vectors; closes a row group (and records progress) when full.
    pub fn write(
        &mut self,
        rows: &[Row],
        vectors: Vec<f32>,
        n_tokens: &[u32],
        truncated: &[bool],
    ) -> anyhow::Result<()> {
        let dim = match self.schema.field_with_name("embedding")?.data_type() {
            DataType::FixedSizeList(_, d) => *d,
            _ => unreachable!("the schema is built above"),
        };
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let mut cols: Vec<ArrayRef> = vec![Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.id.as_str()),
        ))];
        if self.with_text {
            cols.push(Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.text.as_str()),
            )));
        }
        cols.push(Arc::new(StringArray::from_iter_values(
            rows.iter()
                .map(|r| hex::encode(md5::Md5::digest(r.text.as_bytes()))),
        )));
        cols.push(Arc::new(FixedSizeListArray::try_new(
            item,
            dim,
            Arc::new(Float32Array::from(vectors)),
            None,
        )?));
        cols.push(Arc::new(Int32Array::from_iter_values(
            n_tokens.iter().map(|n| *n as i32),
        )));
        cols.push(Arc::new(BooleanArray::from(truncated.to_vec())));
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), cols)?;
        self.add(&batch, rows.last().map_or(self.lines, |r| r.line), true)
    }

    /// `record`: whether a full row group becomes a checkpoint (not while copying rows of a
    /// resumed file, whose checkpoint stays the one to resume from until the copy is done).
    fn add(&mut self, batch: &RecordBatch, last_line: u64, record: bool) -> anyhow::Result<()> {
        self.writer.write(batch)?;
        self.rows += batch.num_rows() as u64;
        self.lines = last_line;
        if self.writer.in_progress_rows() >= self.group_rows {
            self.flush_group(record)?;
        }
        Ok(())
    }

    fn flush_group(&mut self, record: bool) -> anyhow::Result<()> {
        self.writer.flush()?;
        self.writer.write_all(&[0u8; PUSH_THROUGH])?;
        if !record {
            return Ok(());
        }
        self.record()?;
        tracing::debug!(rows = self.rows, lines = self.lines, "row group written");
        Ok(())
    }

    /// Writes the progress file for what is flushed now.
    fn record(&self) -> anyhow::Result<()> {
        Checkpoint {
            identity: self.identity.clone(),
            model_md5: self.model_md5.clone(),
            rows: self.rows,
            lines: self.lines,
            file_len: self.writer.bytes_written() as u64,
            footer: self.footer()?,
        }
        .write(&self.path)
    }

    /// The footer that closes the file after the row groups flushed so far.
    fn footer(&self) -> anyhow::Result<Vec<u8>> {
        let descr = ArrowSchemaConverter::new().convert(&self.schema)?;
        let mut kv = self.kv.clone();
        kv.push(KeyValue::new(
            ARROW_SCHEMA_META_KEY.into(),
            encode_arrow_schema(&self.schema),
        ));
        let file_meta = FileMetaData::new(
            1,
            self.rows as i64,
            Some(format!("llama-cli {}", env!("CARGO_PKG_VERSION"))),
            Some(kv),
            Arc::new(descr),
            None,
        );
        let meta = ParquetMetaData::new(file_meta, self.writer.flushed_row_groups().to_vec());
        let mut out = Vec::new();
        ParquetMetaDataWriter::new(&mut out, &meta).finish()?;
        Ok(out)
    }

    /// Copies the rows of a recovered file (see [`Checkpoint::recover`]) and records them.
    pub fn copy_rows(&mut self, prev: &Path, cp: &Checkpoint) -> anyhow::Result<()> {
        let file = File::open(prev)?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)?
            .with_batch_size(1024)
            .build()?;
        for batch in reader {
            let batch = batch?;
            let batch = RecordBatch::try_new(Arc::clone(&self.schema), batch.columns().to_vec())
                .context(
                    "the file to resume has other columns (was it written with other options?)",
                )?;
            self.add(&batch, cp.lines, false)?;
        }
        if self.rows != cp.rows {
            bail!(
                "{} holds {} rows, its progress file says {}",
                prev.display(),
                self.rows,
                cp.rows
            );
        }
        self.lines = cp.lines;
        self.flush_group(true)?;
        std::fs::remove_file(prev)?;
        Ok(())
    }

    /// Closes the file; the progress file goes, since there is nothing left to resume.
    pub fn finish(mut self) -> anyhow::Result<u64> {
        self.writer.flush()?;
        self.writer.close()?;
        let progress = progress_path(&self.path);
        if progress.exists() {
            std::fs::remove_file(progress)?;
        }
        Ok(self.rows)
    }
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
