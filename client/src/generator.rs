//! Client of llama_agent.generator.v1.GeneratorService.

use crate::call::Transport;
use futures::{Stream, StreamExt};
use llama_agent_proto::generator::v1 as pb;
use llama_agent_proto::generator::v1::generator_service_client::GeneratorServiceClient;

use crate::{ClientError, RetryPolicy};

#[derive(Clone)]
pub struct GeneratorClient {
    inner: GeneratorServiceClient<Transport>,
    retry: RetryPolicy,
}

/// The whole answer of one Generate stream, for callers that do not stream.
#[derive(Clone, Debug, Default)]
pub struct Generated {
    pub text: String,
    pub token_ids: Vec<i32>,
    /// One per token id when the request asked for `logprobs`.
    pub logprobs: Vec<pb::TokenLogprob>,
    pub done: pb::GenerateDone,
}

impl GeneratorClient {
    crate::call::constructors!();

    fn over(transport: Transport) -> Self {
        Self {
            inner: GeneratorServiceClient::new(transport),
            retry: RetryPolicy::default(),
        }
    }

    /// Generate as a stream of chunks ending with the done message. Opening the stream is
    /// retried on UNAVAILABLE and RESOURCE_EXHAUSTED (nothing was generated yet); a stream
    /// that breaks midway is not. Dropping the stream cancels the generation.
    pub async fn generate_stream(
        &self,
        req: pb::GenerateRequest,
        deadline: Option<std::time::Duration>,
    ) -> Result<impl Stream<Item = Result<pb::GenerateResponse, ClientError>>, ClientError> {
        let stream = self
            .retry
            .run(|| {
                let mut c = self.inner.clone();
                let mut request = tonic::Request::new(req.clone());
                if let Some(d) = deadline {
                    request.set_timeout(d);
                }
                async move { c.generate(request).await }
            })
            .await?
            .into_inner();
        Ok(stream.map(|r| r.map_err(ClientError::from)))
    }

    /// Generate to the end; `on_chunk` sees each chunk as it arrives.
    pub async fn generate(
        &self,
        req: pb::GenerateRequest,
        mut on_chunk: impl FnMut(&pb::TextChunk),
    ) -> Result<Generated, ClientError> {
        let mut stream = std::pin::pin!(self.generate_stream(req, None).await?);
        let mut out = Generated::default();
        while let Some(msg) = stream.next().await {
            match msg?.event {
                Some(pb::generate_response::Event::Chunk(c)) => {
                    on_chunk(&c);
                    out.text.push_str(&c.text);
                    out.token_ids.extend_from_slice(&c.token_ids);
                    out.logprobs.extend(c.logprobs);
                }
                Some(pb::generate_response::Event::Done(d)) => {
                    out.done = d;
                    return Ok(out);
                }
                None => {}
            }
        }
        Err(ClientError::Incomplete)
    }

    /// The model's tokenizer: `req.text` as token ids (and pieces), retried on UNAVAILABLE
    /// and RESOURCE_EXHAUSTED (it changes nothing).
    /// These calls have no deadline: the service loads the model first when needed (a
    /// download, then a load), as `ensure` and `generate` do.
    pub async fn tokenize(
        &self,
        req: pb::TokenizeRequest,
    ) -> Result<pb::TokenizeResponse, ClientError> {
        self.retry
            .unary(
                &self.inner,
                req,
                |mut c, r| async move { c.tokenize(r).await },
            )
            .await
    }

    /// The text of `req.ids`.
    pub async fn detokenize(
        &self,
        req: pb::DetokenizeRequest,
    ) -> Result<pb::DetokenizeResponse, ClientError> {
        self.retry
            .unary(
                &self.inner,
                req,
                |mut c, r| async move { c.detokenize(r).await },
            )
            .await
    }

    /// The prompt a chat becomes with the model's (or the named) template, and its tokens.
    pub async fn apply_chat_template(
        &self,
        req: pb::ApplyChatTemplateRequest,
    ) -> Result<pb::ApplyChatTemplateResponse, ClientError> {
        self.retry
            .unary(&self.inner, req, |mut c, r| async move {
                c.apply_chat_template(r).await
            })
            .await
    }

    /// What `model` is, where it runs and how it is served (loading it when needed).
    pub async fn model_info(&self, model: &str) -> Result<pb::GetModelInfoResponse, ClientError> {
        let req = pb::GetModelInfoRequest {
            model: model.to_string(),
        };
        self.retry
            .unary(&self.inner, req, |mut c, r| async move {
                c.get_model_info(r).await
            })
            .await
    }
}
