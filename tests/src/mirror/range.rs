//! The `Range` / `If-Range` subset the hub's CDN honours: one byte range, optionally guarded by
//! the file's strong ETag.

/// What a GET should send back for a file of `total` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Span {
    Full,
    /// Inclusive bounds, as in `Content-Range`.
    Partial {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

/// Decides the span from the request's `Range` and `If-Range`. Anything this server does not
/// understand (other units, several ranges, garbage) falls back to the whole file, which RFC 9110
/// allows and which clients must handle anyway.
pub(crate) fn span(range: Option<&str>, if_range: Option<&str>, etag: &str, total: u64) -> Span {
    let Some(range) = range else {
        return Span::Full;
    };
    if let Some(validator) = if_range {
        // Strong comparison only: a weak or date validator never matches a file's content hash.
        if validator.trim() != etag {
            return Span::Full;
        }
    }
    let Some(spec) = range.trim().strip_prefix("bytes=") else {
        return Span::Full;
    };
    if spec.contains(',') {
        return Span::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Span::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // Suffix form: the last N bytes.
        return match last.parse::<u64>() {
            Ok(0) => Span::Unsatisfiable,
            Ok(_) if total == 0 => Span::Unsatisfiable,
            Ok(n) => Span::Partial {
                start: total.saturating_sub(n),
                end: total - 1,
            },
            Err(_) => Span::Full,
        };
    }
    let Ok(start) = first.parse::<u64>() else {
        return Span::Full;
    };
    let end = if last.is_empty() {
        None
    } else {
        match last.parse::<u64>() {
            Ok(end) if end >= start => Some(end),
            _ => return Span::Full,
        }
    };
    if start >= total {
        return Span::Unsatisfiable;
    }
    Span::Partial {
        start,
        end: end.map_or(total - 1, |e| e.min(total - 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ETAG: &str = "\"abc\"";

    #[test]
    fn forms() {
        let s = |r| span(Some(r), None, ETAG, 100);
        assert_eq!(s("bytes=10-"), Span::Partial { start: 10, end: 99 });
        assert_eq!(s("bytes=10-19"), Span::Partial { start: 10, end: 19 });
        assert_eq!(s("bytes=90-500"), Span::Partial { start: 90, end: 99 });
        assert_eq!(s("bytes=-5"), Span::Partial { start: 95, end: 99 });
        assert_eq!(s("bytes=-500"), Span::Partial { start: 0, end: 99 });
        assert_eq!(s("bytes=100-"), Span::Unsatisfiable);
        assert_eq!(s("bytes=-0"), Span::Unsatisfiable);
        assert_eq!(s("bytes=5-1"), Span::Full);
        assert_eq!(s("bytes=0-1,5-6"), Span::Full);
        assert_eq!(s("items=0-1"), Span::Full);
        assert_eq!(span(None, None, ETAG, 100), Span::Full);
        assert_eq!(span(Some("bytes=0-"), None, ETAG, 0), Span::Unsatisfiable);
    }

    #[test]
    fn if_range_guards_the_range() {
        let hit = span(Some("bytes=10-"), Some("\"abc\""), ETAG, 100);
        assert_eq!(hit, Span::Partial { start: 10, end: 99 });
        assert_eq!(
            span(Some("bytes=10-"), Some("\"abd\""), ETAG, 100),
            Span::Full
        );
        assert_eq!(
            span(Some("bytes=10-"), Some("W/\"abc\""), ETAG, 100),
            Span::Full
        );
    }
}
