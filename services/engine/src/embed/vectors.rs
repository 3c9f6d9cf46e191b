//! The arithmetic after llama.cpp: pooling token vectors, Matryoshka truncation, L2
//! normalization, and cutting token lists to a length. Pure functions, tested here.

use super::request::Pooling;

/// Cuts `tokens` to `cap`, keeping the final token when it is a closing special token
/// ([SEP], EOS) the tokenizer added, as sentence-transformers does. Returns whether it cut.
pub(super) fn cap_tokens<T: Copy>(tokens: &mut Vec<T>, cap: usize, keep_last: bool) -> bool {
    if tokens.len() <= cap {
        return false;
    }
    let last = tokens[tokens.len() - 1];
    if keep_last && cap >= 2 {
        tokens.truncate(cap - 1);
        tokens.push(last);
    } else {
        tokens.truncate(cap);
    }
    true
}

/// Pools one sequence's token vectors (`rows`, each `out.len()` wide) into `out`.
pub(super) fn pool(pooling: Pooling, rows: &[&[f32]], out: &mut [f32]) {
    out.fill(0.0);
    let pick = match pooling {
        // A reranker's scores come from llama.cpp's own head, never from token rows.
        Pooling::Cls | Pooling::Rank => rows.first(),
        Pooling::Last => rows.last(),
        Pooling::Mean => {
            for row in rows {
                for (o, v) in out.iter_mut().zip(row.iter()) {
                    *o += *v;
                }
            }
            let n = rows.len().max(1) as f32;
            out.iter_mut().for_each(|o| *o /= n);
            return;
        }
    };
    if let Some(row) = pick {
        out.copy_from_slice(&row[..out.len()]);
    }
}

/// Scales `v` to unit length (a zero vector stays zero).
pub(super) fn l2_normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        let inv = (1.0 / norm) as f32;
        v.iter_mut().for_each(|x| *x *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capping_keeps_the_closing_token() {
        let mut t = vec![101, 1, 2, 3, 4, 102];
        assert!(cap_tokens(&mut t, 4, true));
        assert_eq!(t, vec![101, 1, 2, 102]);
        let mut t = vec![1, 2, 3, 4];
        assert!(cap_tokens(&mut t, 2, false));
        assert_eq!(t, vec![1, 2]);
        let mut t = vec![1, 2];
        assert!(!cap_tokens(&mut t, 2, true));
        let mut t = vec![7, 8, 9];
        assert!(cap_tokens(&mut t, 1, true));
        assert_eq!(t, vec![7]);
    }

    #[test]
    fn pooling_modes() {
        let a = [1.0, 2.0];
        let b = [3.0, 6.0];
        let rows: Vec<&[f32]> = vec![&a, &b];
        let mut out = [0.0; 2];
        pool(Pooling::Mean, &rows, &mut out);
        assert_eq!(out, [2.0, 4.0]);
        pool(Pooling::Cls, &rows, &mut out);
        assert_eq!(out, [1.0, 2.0]);
        pool(Pooling::Last, &rows, &mut out);
        assert_eq!(out, [3.0, 6.0]);
    }

    #[test]
    fn normalization() {
        let mut v = [3.0, 4.0];
        l2_normalize(&mut v);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut z = [0.0, 0.0];
        l2_normalize(&mut z);
        assert_eq!(z, [0.0, 0.0]);
    }
}
