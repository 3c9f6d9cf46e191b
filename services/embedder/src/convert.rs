//! Between the wire and the engine: request options checked and turned into engine
//! parameters, vectors packed as little-endian f32 or f16 bytes.

use llama_agent_engine::embed::{EmbedParams, Embedded, Pooling};
use llama_agent_proto::embedder::v1 as pb;

use crate::EmbedderError;

/// Texts per request (or stream message) at most: enough for any batch size a client
/// sensibly sends, small enough that one request cannot hold the engine for minutes.
pub const MAX_TEXTS: usize = 4096;

/// Checks the options before any model is touched. Truncation is on unless the request
/// turns it off; an unset `normalize` means normalized.
pub fn params(
    options: Option<&pb::EmbedOptions>,
) -> Result<(EmbedParams, pb::DType), EmbedderError> {
    let o = options.cloned().unwrap_or_default();
    let pooling = match pb::Pooling::try_from(o.pooling) {
        Ok(pb::Pooling::Unspecified) => None,
        Ok(pb::Pooling::Mean) => Some(Pooling::Mean),
        Ok(pb::Pooling::Cls) => Some(Pooling::Cls),
        Ok(pb::Pooling::Last) => Some(Pooling::Last),
        Ok(pb::Pooling::Rank) => {
            return Err(EmbedderError::Invalid(
                "pooling rank is a reranker's; score pairs with Rerank".into(),
            ))
        }
        Err(_) => {
            return Err(EmbedderError::Invalid(format!(
                "unknown pooling {}",
                o.pooling
            )))
        }
    };
    let dtype = match pb::DType::try_from(o.dtype) {
        Ok(pb::DType::Unspecified) | Ok(pb::DType::F32) => pb::DType::F32,
        Ok(pb::DType::F16) => pb::DType::F16,
        Err(_) => return Err(EmbedderError::Invalid(format!("unknown dtype {}", o.dtype))),
    };
    Ok((
        EmbedParams {
            pooling,
            normalize: o.normalize.unwrap_or(true),
            max_length: o.max_length,
            truncate: o.truncate.unwrap_or(true),
            dimensions: o.dimensions,
            prefix: text_prefix(&o.instruction, &o.prefix)?,
        },
        dtype,
    ))
}

/// Longest instruction or prefix: a task description, not a document.
const MAX_PREFIX_BYTES: usize = 4096;

/// What goes before each text: the instruction in the form instruction-tuned embedders are
/// trained on (Qwen3-Embedding's model card: `Instruct: {task}\nQuery:{query}`), then the
/// literal prefix.
fn text_prefix(instruction: &str, prefix: &str) -> Result<String, EmbedderError> {
    for (what, s) in [("instruction", instruction), ("prefix", prefix)] {
        if s.len() > MAX_PREFIX_BYTES {
            return Err(EmbedderError::Invalid(format!(
                "{what} has {} bytes, more than {MAX_PREFIX_BYTES}",
                s.len()
            )));
        }
    }
    Ok(match instruction {
        "" => prefix.to_string(),
        i => format!("Instruct: {i}\nQuery:{prefix}"),
    })
}

/// The request's texts, or why they cannot be embedded.
pub fn check_count(n: usize, what: &str) -> Result<(), EmbedderError> {
    if n == 0 {
        return Err(EmbedderError::Invalid(format!(
            "{what} has no texts to embed"
        )));
    }
    if n > MAX_TEXTS {
        return Err(EmbedderError::Invalid(format!(
            "{what} has {n} texts, more than {MAX_TEXTS}; split it"
        )));
    }
    Ok(())
}

pub fn pooling_pb(p: Pooling) -> pb::Pooling {
    match p {
        Pooling::Mean => pb::Pooling::Mean,
        Pooling::Cls => pb::Pooling::Cls,
        Pooling::Last => pb::Pooling::Last,
        Pooling::Rank => pb::Pooling::Rank,
    }
}

pub fn embeddings_pb(e: &Embedded, dtype: pb::DType) -> pb::Embeddings {
    let data = match dtype {
        pb::DType::F16 => e
            .vectors
            .iter()
            .flat_map(|v| f16_bits(*v).to_le_bytes())
            .collect(),
        _ => e.vectors.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    pb::Embeddings {
        dtype: dtype as i32,
        dim: e.dim as u32,
        count: e.token_counts.len() as u32,
        data,
        token_counts: e.token_counts.clone(),
        truncated: e.truncated.clone(),
    }
}

/// IEEE 754 binary16 bits of `x`, rounded to nearest even (overflow becomes infinity).
fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x007f_ffff;
    if exp == 0xff {
        // Infinity stays infinity; NaN stays a (quiet) NaN.
        return sign | 0x7c00 | if man != 0 { 0x0200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Subnormal half (or zero): shift the mantissa with its implicit bit in.
        if e < -10 {
            return sign;
        }
        let m = man | 0x0080_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rounded = m + half - 1 + ((m >> shift) & 1);
        return sign | (rounded >> shift) as u16;
    }
    let rounded = man + 0x0fff + ((man >> 13) & 1);
    if rounded & 0x0080_0000 != 0 {
        // The mantissa carried into the exponent.
        let e = e + 1;
        if e >= 0x1f {
            return sign | 0x7c00;
        }
        return sign | ((e as u16) << 10);
    }
    sign | ((e as u16) << 10) | (rounded >> 13) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_bits() {
        assert_eq!(f16_bits(0.0), 0x0000);
        assert_eq!(f16_bits(-0.0), 0x8000);
        assert_eq!(f16_bits(1.0), 0x3c00);
        assert_eq!(f16_bits(-2.0), 0xc000);
        assert_eq!(f16_bits(0.5), 0x3800);
        assert_eq!(f16_bits(65504.0), 0x7bff);
        assert_eq!(f16_bits(1e6), 0x7c00);
        assert_eq!(f16_bits(f32::INFINITY), 0x7c00);
        assert_eq!(f16_bits(5.960_464_5e-8), 0x0001);
        assert_eq!(f16_bits(0.333_333_34), 0x3555);
        assert_eq!(f16_bits(1.0 + 1.0 / 2048.0), 0x3c00, "ties round to even");
        assert!(f16_bits(f32::NAN) & 0x7c00 == 0x7c00 && f16_bits(f32::NAN) & 0x3ff != 0);
    }

    #[test]
    fn options_default_to_normalized_and_truncating() {
        let (p, dtype) = params(None).unwrap();
        assert!(p.normalize && p.truncate && p.pooling.is_none());
        assert_eq!(dtype, pb::DType::F32);
        let bad = pb::EmbedOptions {
            pooling: 9,
            ..Default::default()
        };
        assert!(params(Some(&bad)).is_err());
        assert!(check_count(0, "the request").is_err());
        assert!(check_count(MAX_TEXTS + 1, "the request").is_err());
    }
}
