//! Rerank: a query scored against documents by a cross-encoder, the pairs packed into the
//! model's batches like texts to embed; results sorted best first.

use llama_agent_engine::embed::{Embedded, EmbeddingEngine, RerankRequest};
use llama_agent_engine::EngineError;
use llama_agent_models::ModelPool;
use llama_agent_proto::embedder::v1 as pb;

use crate::convert::MAX_TEXTS;
use crate::service::require_model;
use crate::EmbedderError;

/// Longest query: a question, not a document (it is repeated in every pair).
const MAX_QUERY_BYTES: usize = 16 * 1024;

pub(crate) async fn rerank(
    pool: &ModelPool<EmbeddingEngine>,
    r: pb::RerankRequest,
    deadline: Option<std::time::Instant>,
) -> Result<pb::RerankResponse, EmbedderError> {
    require_model(&r.model)?;
    check(&r)?;
    let (engine, info) = pool.get(&r.model).await?;
    let reply = engine.rerank(RerankRequest {
        query: r.query,
        documents: r.documents.clone(),
        truncate: r.truncate.unwrap_or(true),
        deadline,
        span: tracing::Span::current(),
    })?;
    let out = reply.await.map_err(|_| EngineError::Stopped)??;
    let mut results = results(&out, r.sigmoid);
    let prompt_tokens = out.token_counts.iter().sum();
    if let Some(n) = r.top_n.filter(|&n| n > 0) {
        results.truncate(n as usize);
    }
    if r.return_documents {
        let mut docs = r.documents;
        for res in &mut results {
            res.document = Some(std::mem::take(&mut docs[res.index as usize]));
        }
    }
    Ok(pb::RerankResponse {
        results,
        model_md5: info.md5,
        prompt_tokens,
    })
}

fn check(r: &pb::RerankRequest) -> Result<(), EmbedderError> {
    let n = r.documents.len();
    if n == 0 {
        return Err(EmbedderError::Invalid("no documents to rerank".into()));
    }
    if n > MAX_TEXTS {
        return Err(EmbedderError::Invalid(format!(
            "the request has {n} documents, more than {MAX_TEXTS}; split it"
        )));
    }
    if r.query.len() > MAX_QUERY_BYTES {
        return Err(EmbedderError::Invalid(format!(
            "the query has {} bytes, more than {MAX_QUERY_BYTES}",
            r.query.len()
        )));
    }
    Ok(())
}

/// Every document's result, best first: highest logit, ties in input order (a stable sort,
/// as llama-server's).
fn results(out: &Embedded, sigmoid: bool) -> Vec<pb::RerankResult> {
    let dim = out.dim.max(1);
    let mut results: Vec<pb::RerankResult> = out
        .vectors
        .chunks_exact(dim)
        .enumerate()
        .map(|(i, row)| {
            let logit = row[0];
            pb::RerankResult {
                index: i as u32,
                score: if sigmoid { sigmoid_of(logit) } else { logit },
                logit,
                document: None,
                tokens: out.token_counts[i],
                truncated: out.truncated[i],
            }
        })
        .collect();
    results.sort_by(|a, b| b.logit.total_cmp(&a.logit));
    results
}

fn sigmoid_of(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama_agent_engine::embed::Pooling;

    #[test]
    fn results_are_best_first_and_stable() {
        let out = Embedded {
            dim: 1,
            vectors: vec![0.5, 2.0, 0.5, -1.0],
            token_counts: vec![3, 4, 5, 6],
            truncated: vec![false, true, false, false],
            pooling: Pooling::Rank,
            normalized: false,
        };
        let r = results(&out, false);
        let order: Vec<u32> = r.iter().map(|r| r.index).collect();
        assert_eq!(order, vec![1, 0, 2, 3]);
        assert_eq!(r[0].score, 2.0);
        assert!(r[0].truncated && r[0].tokens == 4);
        let s = results(&out, true);
        assert!((s[0].score - 0.880_797).abs() < 1e-5 && s[0].logit == 2.0);
    }

    #[test]
    fn bad_requests_are_named() {
        let mut r = pb::RerankRequest {
            model: "m".into(),
            query: "q".into(),
            ..Default::default()
        };
        assert!(check(&r).unwrap_err().to_string().contains("no documents"));
        r.documents = vec![String::new(); MAX_TEXTS + 1];
        assert!(check(&r).unwrap_err().to_string().contains("more than"));
        r.documents = vec!["d".into()];
        r.query = "x".repeat(MAX_QUERY_BYTES + 1);
        assert!(check(&r).unwrap_err().to_string().contains("query"));
    }
}
