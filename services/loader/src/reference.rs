//! Model references: what a user may type, parsed once and checked before anything touches disk.
//!
//! Hub: `owner/repo`, `owner/repo:QUANT`, `owner/repo/path/file.gguf`, each with `@revision`.
//! Local: a path starting with `/`, `./`, `../` or `~/`, imported into the cache.

use std::fmt;
use std::path::PathBuf;

use crate::error::LoaderError;

pub const DEFAULT_REVISION: &str = "main";

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ModelRef {
    Hub(HubRef),
    Local(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HubRef {
    pub repo: String,
    pub selector: FileSelector,
    pub revision: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FileSelector {
    /// Pick by the default quant preference.
    Auto,
    Quant(String),
    File(String),
}

impl ModelRef {
    pub fn parse(input: &str) -> Result<Self, LoaderError> {
        let s = input.trim();
        let bad = |why: &str| LoaderError::InvalidReference {
            reference: input.to_string(),
            reason: why.to_string(),
        };
        if s.is_empty() {
            return Err(bad("empty model reference"));
        }
        if s.chars().any(|c| c.is_control()) {
            return Err(bad("control characters are not allowed"));
        }
        if let Some(rest) = s.strip_prefix("~/") {
            let home = std::env::var_os("HOME").ok_or_else(|| bad("HOME is not set"))?;
            return Ok(ModelRef::Local(PathBuf::from(home).join(rest)));
        }
        if s.starts_with('/') || s.starts_with("./") || s.starts_with("../") {
            return Ok(ModelRef::Local(PathBuf::from(s)));
        }

        let (body, revision) = match s.rsplit_once('@') {
            Some((b, r)) => {
                check_revision(r).map_err(|w| bad(&w))?;
                (b, r.to_string())
            }
            None => (s, DEFAULT_REVISION.to_string()),
        };
        let (body, quant) = match body.rsplit_once(':') {
            Some((b, q)) => {
                if q.is_empty() || !q.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(bad("a quant tag is letters, digits and '_' (e.g. Q4_K_M)"));
                }
                (b, Some(q.to_ascii_uppercase()))
            }
            None => (body, None),
        };
        let parts: Vec<&str> = body.split('/').collect();
        if parts.len() < 2 {
            return Err(bad(
                "expected owner/repo[:QUANT | /file.gguf][@revision] or a local path",
            ));
        }
        for name in &parts[..2] {
            check_repo_part(name).map_err(|w| bad(&w))?;
        }
        let repo = format!("{}/{}", parts[0], parts[1]);
        let selector = if parts.len() > 2 {
            if quant.is_some() {
                return Err(bad("give either a file or a :QUANT, not both"));
            }
            let file = parts[2..].join("/");
            check_file_path(&file).map_err(|w| bad(&w))?;
            FileSelector::File(file)
        } else if let Some(q) = quant {
            FileSelector::Quant(q)
        } else {
            FileSelector::Auto
        };
        Ok(ModelRef::Hub(HubRef {
            repo,
            selector,
            revision,
        }))
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelRef::Local(p) => write!(f, "local:{}", p.display()),
            ModelRef::Hub(h) => write!(f, "{h}"),
        }
    }
}

impl fmt::Display for HubRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.selector {
            FileSelector::Auto => write!(f, "{}@{}", self.repo, self.revision),
            FileSelector::Quant(q) => write!(f, "{}:{}@{}", self.repo, q, self.revision),
            FileSelector::File(file) => write!(f, "{}/{}@{}", self.repo, file, self.revision),
        }
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn check_repo_part(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 96 {
        return Err("owner and repo names are 1 to 96 characters".into());
    }
    if !name.chars().all(is_name_char) {
        return Err(format!(
            "'{name}': owner and repo names use only letters, digits, '-', '_' and '.'"
        ));
    }
    if name.starts_with(['.', '-']) || name.contains("..") {
        return Err(format!("'{name}' is not a valid owner or repo name"));
    }
    Ok(())
}

/// A repo file path becomes a path under the cache, so nothing in it may climb out of it.
pub fn check_file_path(file: &str) -> Result<(), String> {
    if file.len() > 512 {
        return Err("file path too long".into());
    }
    for comp in file.split('/') {
        if comp.is_empty() || comp == "." || comp == ".." {
            return Err(format!(
                "'{file}': empty, '.' or '..' path components are not allowed"
            ));
        }
        if comp.starts_with('.') {
            return Err(format!("'{file}': hidden path components are not allowed"));
        }
        if !comp.chars().all(is_name_char) {
            return Err(format!(
                "'{file}': file names use only letters, digits, '-', '_' and '.'"
            ));
        }
    }
    if !file.to_ascii_lowercase().ends_with(".gguf") {
        return Err(format!("'{file}' is not a .gguf file"));
    }
    Ok(())
}

fn check_revision(rev: &str) -> Result<(), String> {
    if rev.is_empty() || rev.len() > 255 {
        return Err("a revision is 1 to 255 characters".into());
    }
    let ok = rev
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if !ok || rev.contains("..") || rev.starts_with('/') || rev.ends_with('/') {
        return Err(format!("'{rev}' is not a valid revision"));
    }
    Ok(())
}

/// The revision as one safe directory name (`refs/pr/1` → `refs--pr--1`).
pub fn revision_dir(rev: &str) -> String {
    rev.replace('/', "--")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(s: &str) -> HubRef {
        match ModelRef::parse(s).unwrap() {
            ModelRef::Hub(h) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_the_hub_forms() {
        let h = hub("Qwen/Qwen2.5-7B-Instruct-GGUF");
        assert_eq!(h.repo, "Qwen/Qwen2.5-7B-Instruct-GGUF");
        assert_eq!(h.selector, FileSelector::Auto);
        assert_eq!(h.revision, "main");
        assert_eq!(hub("a/b:q8_0").selector, FileSelector::Quant("Q8_0".into()));
        let h = hub("a/b/sub/m-Q4_K_M.gguf@v1.0");
        assert_eq!(h.selector, FileSelector::File("sub/m-Q4_K_M.gguf".into()));
        assert_eq!(h.revision, "v1.0");
        assert_eq!(hub("a/b@refs/pr/1").revision, "refs/pr/1");
        assert_eq!(hub("a/b:Q8_0@main").to_string(), "a/b:Q8_0@main");
    }

    #[test]
    fn parses_local_paths() {
        assert_eq!(
            ModelRef::parse("/models/x.gguf").unwrap(),
            ModelRef::Local("/models/x.gguf".into())
        );
        assert!(matches!(
            ModelRef::parse("./x.gguf").unwrap(),
            ModelRef::Local(_)
        ));
    }

    #[test]
    fn rejects_what_could_escape_or_is_malformed() {
        for bad in [
            "",
            "justaname",
            "a/b/../../etc/passwd.gguf",
            "a/b/./x.gguf",
            "a/b//x.gguf",
            "a/b/x.bin",
            "a/b/.hidden.gguf",
            "a/b/x y.gguf",
            "../a/b",
            "a/..",
            "a b/c",
            "a/b:Q4 K",
            "a/b:",
            "a/b/x.gguf:Q8_0",
            "a/b@",
            "a/b@../x",
            "a/\tb",
            "a/b/x\u{0}.gguf",
            "a/b/ü.gguf",
        ] {
            let r = ModelRef::parse(bad);
            if bad == "../a/b" {
                // A relative local path: accepted here, checked against the disk later.
                assert!(matches!(r, Ok(ModelRef::Local(_))));
                continue;
            }
            assert!(
                matches!(r, Err(LoaderError::InvalidReference { .. })),
                "{bad:?} gave {r:?}"
            );
        }
    }
}
