//! The gRPC face of the loader: request validation and mapping, nothing else.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use llama_agent_proto::common::v1 as common;
use llama_agent_proto::loader::v1 as pb;
use llama_agent_proto::loader::v1::loader_service_server::LoaderService;
use tonic::{Request, Response, Status};

use crate::cache::LeaseRec;
use crate::error::LoaderError;
use crate::loader::{EnsureEvent, EnsureOptions, Loader, ProgressEvent, Stage};
use crate::store::{Entry, Source};

pub struct LoaderGrpc {
    loader: Arc<Loader>,
}

impl LoaderGrpc {
    pub fn new(loader: Arc<Loader>) -> Self {
        Self { loader }
    }
}

impl From<&LoaderError> for Status {
    fn from(e: &LoaderError) -> Self {
        let msg = e.to_string();
        match e {
            LoaderError::InvalidReference { .. } | LoaderError::InvalidArgument(_) => {
                Status::invalid_argument(msg)
            }
            LoaderError::RepoNotFound { .. }
            | LoaderError::FileNotFound(_)
            | LoaderError::NotCached(_)
            | LoaderError::LeaseNotFound(_) => Status::not_found(msg),
            LoaderError::LocalFile { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => Status::not_found(msg),
                std::io::ErrorKind::PermissionDenied => Status::permission_denied(msg),
                _ => Status::internal(msg),
            },
            LoaderError::OutOfRange(_) => Status::out_of_range(msg),
            LoaderError::Leased { .. } => Status::failed_precondition(msg),
            LoaderError::CacheFull(_) => Status::resource_exhausted(msg),
            LoaderError::Hub(_) | LoaderError::Download { .. } | LoaderError::ShuttingDown => {
                Status::unavailable(msg)
            }
            LoaderError::Integrity { .. } => Status::data_loss(msg),
            LoaderError::Io { .. } | LoaderError::Manifest(_) => Status::internal(msg),
        }
    }
}

impl From<LoaderError> for Status {
    fn from(e: LoaderError) -> Self {
        Status::from(&e)
    }
}

pub fn model_info(loader: &Loader, e: &Entry) -> common::ModelInfo {
    let root = loader.cache().root();
    let files: Vec<common::ModelFile> = e
        .files
        .iter()
        .map(|f| common::ModelFile {
            name: f.name.clone(),
            size_bytes: f.size,
            md5: f.md5.clone(),
            sha256: f.sha256.clone().unwrap_or_default(),
            local_path: e.file_path(root, f).display().to_string(),
        })
        .collect();
    let (repo, revision, commit) = match &e.source {
        Source::Hub {
            repo,
            revision,
            commit,
        } => (repo.clone(), revision.clone(), commit.clone()),
        Source::Local { .. } => Default::default(),
    };
    let primary = files.first().cloned().unwrap_or_default();
    common::ModelInfo {
        reference: e.key.clone(),
        local_path: primary.local_path,
        size_bytes: e.size(),
        md5: primary.md5,
        sha256: primary.sha256,
        repo,
        file: primary.name,
        revision,
        commit,
        files,
    }
}

fn lease_pb(l: &LeaseRec) -> pb::Lease {
    pb::Lease {
        lease_id: l.id.clone(),
        reference: l.key.clone(),
        expires_unix_ms: l.expires_unix_ms(),
        holder: l.holder.clone(),
    }
}

fn progress_pb(p: &ProgressEvent) -> pb::Progress {
    let stage = match p.stage {
        Stage::Resolving => pb::Stage::Resolving,
        Stage::Waiting => pb::Stage::Waiting,
        Stage::Evicting => pb::Stage::Evicting,
        Stage::Downloading => pb::Stage::Downloading,
        Stage::Importing => pb::Stage::Importing,
        Stage::Verifying => pb::Stage::Verifying,
    };
    pb::Progress {
        stage: stage as i32,
        file: p.file.clone(),
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        resumed_from: p.resumed_from,
    }
}

type EnsureStream = Pin<Box<dyn Stream<Item = Result<pb::EnsureModelResponse, Status>> + Send>>;
type FileStream = Pin<Box<dyn Stream<Item = Result<pb::ReadModelFileResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LoaderService for LoaderGrpc {
    type EnsureModelStream = EnsureStream;
    type ReadModelFileStream = FileStream;

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model))]
    async fn ensure_model(
        &self,
        req: Request<pb::EnsureModelRequest>,
    ) -> Result<Response<Self::EnsureModelStream>, Status> {
        let r = req.into_inner();
        let events = self.loader.ensure(
            &r.model,
            EnsureOptions {
                refresh: r.refresh,
                lease_ttl_secs: r.lease_ttl_seconds,
                lease_holder: r.lease_holder,
            },
        )?;
        let loader = Arc::clone(&self.loader);
        let out = events.map(move |ev| match ev {
            Ok(EnsureEvent::Progress(p)) => Ok(pb::EnsureModelResponse {
                event: Some(pb::ensure_model_response::Event::Progress(progress_pb(&p))),
                lease: None,
                cache_hit: false,
            }),
            Ok(EnsureEvent::Done(d)) => Ok(pb::EnsureModelResponse {
                event: Some(pb::ensure_model_response::Event::Model(model_info(
                    &loader, &d.entry,
                ))),
                lease: d.lease.as_ref().map(lease_pb),
                cache_hit: d.cache_hit,
            }),
            Err(e) => Err(Status::from(e.as_ref())),
        });
        Ok(Response::new(Box::pin(out)))
    }

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model, offset = req.get_ref().offset))]
    async fn read_model_file(
        &self,
        req: Request<pb::ReadModelFileRequest>,
    ) -> Result<Response<Self::ReadModelFileStream>, Status> {
        let r = req.into_inner();
        let blocks = crate::file_stream::read(&self.loader, &r.model, &r.file, r.offset)?;
        let out = tokio_stream::wrappers::ReceiverStream::new(blocks)
            .map(|b| b.map_err(|e| Status::from(&e)));
        Ok(Response::new(Box::pin(out)))
    }

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model))]
    async fn get_model(
        &self,
        req: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::GetModelResponse>, Status> {
        let entry = self.loader.get(&req.get_ref().model)?;
        Ok(Response::new(pb::GetModelResponse {
            model: Some(model_info(&self.loader, &entry)),
        }))
    }

    async fn list_models(
        &self,
        _req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self
            .loader
            .cache()
            .list()
            .iter()
            .map(|(e, leases)| pb::CachedModel {
                model: Some(model_info(&self.loader, e)),
                last_used_unix_ms: e.last_used_ms,
                leases: leases.iter().map(lease_pb).collect(),
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model))]
    async fn evict_model(
        &self,
        req: Request<pb::EvictModelRequest>,
    ) -> Result<Response<pb::EvictModelResponse>, Status> {
        let r = req.into_inner();
        let (reference, bytes_freed) = self.loader.evict(&r.model, r.force)?;
        Ok(Response::new(pb::EvictModelResponse {
            bytes_freed,
            reference,
        }))
    }

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model))]
    async fn verify_model(
        &self,
        req: Request<pb::VerifyModelRequest>,
    ) -> Result<Response<pb::VerifyModelResponse>, Status> {
        let r = req.into_inner();
        let v = self.loader.verify(&r.model, r.repair).await?;
        Ok(Response::new(pb::VerifyModelResponse {
            ok: v.ok,
            detail: v.detail,
            repaired: v.repaired,
            model: Some(model_info(&self.loader, &v.entry)),
        }))
    }

    async fn cache_status(
        &self,
        _req: Request<pb::CacheStatusRequest>,
    ) -> Result<Response<pb::CacheStatusResponse>, Status> {
        let cache = self.loader.cache();
        let s = cache.stats();
        Ok(Response::new(pb::CacheStatusResponse {
            cache_dir: cache.root().display().to_string(),
            bytes_used: s.bytes_used,
            max_bytes: cache.max_bytes(),
            entries: s.entries as u32,
            leased_entries: s.leased_entries as u32,
            downloads_in_flight: self.loader.downloads_in_flight() as u32,
            partial_bytes: s.partial_bytes,
        }))
    }

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model))]
    async fn lease_model(
        &self,
        req: Request<pb::LeaseModelRequest>,
    ) -> Result<Response<pb::LeaseModelResponse>, Status> {
        let r = req.into_inner();
        let (lease, entry) = self.loader.lease(&r.model, r.ttl_seconds, &r.holder)?;
        Ok(Response::new(pb::LeaseModelResponse {
            lease: Some(lease_pb(&lease)),
            model: Some(model_info(&self.loader, &entry)),
        }))
    }

    async fn renew_lease(
        &self,
        req: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let r = req.into_inner();
        let lease = self.loader.cache().renew(&r.lease_id, r.ttl_seconds)?;
        Ok(Response::new(pb::RenewLeaseResponse {
            lease: Some(lease_pb(&lease)),
        }))
    }

    async fn release_lease(
        &self,
        req: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseResponse>, Status> {
        self.loader.cache().release(&req.get_ref().lease_id)?;
        Ok(Response::new(pb::ReleaseLeaseResponse {}))
    }
}
