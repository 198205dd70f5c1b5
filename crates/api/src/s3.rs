//! The embedded S3-compatible bucket endpoint (OBS speaks the S3 dialect), on its own port.
//!
//! The protocol layer (routing, XML, AWS SigV4 and aws-chunked bodies) is the `s3s` crate;
//! this module implements its [`S3`] trait by calling [`openims_core::buckets`] and
//! [`openims_core::objects`], which own every rule. Signatures are checked against the AK/SK
//! keys table ([`KeyAuth`]); the caller's project is the key's project. Domain errors become
//! S3 error codes in one place ([`s3_error_of`]).
//!
//! Supported: CreateBucket, DeleteBucket, HeadBucket, ListBuckets, GetBucketLocation,
//! ListObjects (v1, v2), PutObject, GetObject (Range, If-Match, If-None-Match), HeadObject,
//! DeleteObject, DeleteObjects, CopyObject, the multipart upload operations (Create, UploadPart,
//! Complete, Abort, ListParts, ListMultipartUploads) and Put/Get/DeleteBucketPolicy.

use axum::error_handling::HandleError;
use axum::Router;
use base64::Engine;
use bytes::Bytes;
use futures::Stream;
use http::{Response, StatusCode};
use openims_core::buckets::{
    bare_etag, BucketObjects, CompletePart, ListRequest, ObjectAttrs, ObjectInfo,
};
use openims_core::objects::{ObjectReader, PutOptions};
use openims_core::{CoreError, ProjectId, Service};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use s3s::auth::{S3Auth, SecretKey};
use s3s::dto::*;
use s3s::service::S3ServiceBuilder;
use s3s::stream::{ByteStream, RemainingLength};
use s3s::{s3_error, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, S3};
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// Bytes per message of a GetObject body.
const READ_BLOCK: usize = 1 << 20;

/// The S3 endpoint as an axum router (all paths), ready for `axum::serve`. Requests are
/// traced (span `s3` with method, path and `X-Request-Id`, which responses carry).
pub fn router(svc: Arc<Service>) -> Router {
    let mut builder = S3ServiceBuilder::new(OpenImsS3 { svc: svc.clone() });
    builder.set_auth(KeyAuth { svc });
    let service = builder.build();
    let service = HandleError::new(service, |err: s3s::HttpError| async move {
        tracing::error!(error = ?err, "S3 request failed");
        let mut resp = Response::new(axum::body::Body::from("internal error"));
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        resp
    });
    let request_id = http::HeaderName::from_static("x-request-id");
    let traced = tower::ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &http::Request<_>| {
                tracing::info_span!("s3", method = %req.method(), path = %req.uri().path(), request_id = %crate::request_id_of(req))
            }),
        )
        .layer(PropagateRequestIdLayer::new(request_id));
    Router::new()
        .fallback_service(service)
        .layer(axum::middleware::from_fn(settle_body))
        .layer(traced)
}

/// [`crate::conn::settle`] for the S3 endpoint: a request body that arrives incomplete gets the
/// S3 `IncompleteBody` error.
async fn settle_body(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    crate::conn::settle(req, next, |e| {
        tracing::warn!(error = %e, "S3 request body could not be read");
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>IncompleteBody</Code>\
                   <Message>The request body could not be read.</Message></Error>";
        let mut resp = axum::response::Response::new(axum::body::Body::from(xml));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/xml"),
        );
        resp
    })
    .await
}

/// SigV4 secrets from the AK/SK keys table.
struct KeyAuth {
    svc: Arc<Service>,
}

#[async_trait::async_trait]
impl S3Auth for KeyAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        match self.svc.db.lookup_key(access_key).await {
            Ok(Some(grant)) => Ok(SecretKey::from(grant.secret_key)),
            Ok(None) => Err(s3_error!(
                InvalidAccessKeyId,
                "The access key does not exist."
            )),
            Err(e) => Err(s3_error_of(e)),
        }
    }
}

/// The `S3` implementation over the service.
struct OpenImsS3 {
    svc: Arc<Service>,
}

/// The S3 error for a domain error.
pub fn s3_error_of(e: CoreError) -> S3Error {
    use S3ErrorCode as C;
    let code = match &e {
        CoreError::NoSuchBucket(_) => C::NoSuchBucket,
        CoreError::NoSuchKey(_) => C::NoSuchKey,
        CoreError::NoSuchUpload(_) => C::NoSuchUpload,
        CoreError::NoSuchBucketPolicy(_) => C::NoSuchBucketPolicy,
        CoreError::BucketAlreadyExists(_) => C::BucketAlreadyExists,
        CoreError::BucketAlreadyOwnedByYou(_) => C::BucketAlreadyOwnedByYou,
        CoreError::BucketNotEmpty(_) => C::BucketNotEmpty,
        CoreError::InvalidBucketName(_) => C::InvalidBucketName,
        CoreError::InvalidObjectKey(_) => C::KeyTooLongError,
        CoreError::AccessDenied(_) => C::AccessDenied,
        CoreError::MalformedPolicy(_) => C::MalformedPolicy,
        CoreError::EntityTooSmall(_) => C::EntityTooSmall,
        CoreError::EntityTooLarge(_) => C::EntityTooLarge,
        CoreError::InvalidPart(_) => C::InvalidPart,
        CoreError::InvalidPartOrder(_) => C::InvalidPartOrder,
        CoreError::ObjectExists(_) => C::PreconditionFailed,
        CoreError::IncompleteBody(_) => C::IncompleteBody,
        CoreError::BadDigest(_) => C::BadDigest,
        CoreError::InvalidRequest(_) => C::InvalidRequest,
        _ => {
            tracing::error!(error = %e, "S3 internal error");
            return S3Error::with_message(
                C::InternalError,
                "The service failed to complete the request; see the server log.",
            );
        }
    };
    let code = match (&e, code) {
        // A key too long or with control characters: S3 says KeyTooLongError only for length.
        (CoreError::InvalidObjectKey(m), _) if !m.contains("bytes long") => C::InvalidArgument,
        (_, c) => c,
    };
    S3Error::with_message(code, e.to_string())
}

fn core<T>(r: openims_core::Result<T>) -> S3Result<T> {
    r.map_err(s3_error_of)
}

/// Characters kept as-is by `encoding-type=url` (everything else is percent-encoded, so both
/// `unquote` and `unquote_plus` decode it).
const URL_KEEP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

fn encoder(encoding: Option<&EncodingType>) -> impl Fn(String) -> String {
    let url = encoding.is_some_and(|e| e.as_str() == EncodingType::URL);
    move |s: String| {
        if url {
            utf8_percent_encode(&s, URL_KEEP).to_string()
        } else {
            s
        }
    }
}

fn timestamp(ms: i64) -> Timestamp {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    Timestamp::from(t)
}

fn quoted(etag: &str) -> ETag {
    ETag::Strong(etag.to_string())
}

fn attrs_of(content_type: Option<ContentType>, metadata: Option<Metadata>) -> ObjectAttrs {
    ObjectAttrs {
        content_type,
        metadata: metadata
            .map(|m| m.into_iter().collect::<BTreeMap<_, _>>())
            .unwrap_or_default(),
    }
}

fn metadata_of(info: &ObjectInfo) -> Option<Metadata> {
    if info.metadata.is_empty() {
        None
    } else {
        Some(info.metadata.clone().into_iter().collect())
    }
}

fn content_length(n: Option<i64>) -> Option<u64> {
    n.and_then(|n| u64::try_from(n).ok())
}

fn part_number(n: i32) -> S3Result<u32> {
    u32::try_from(n).map_err(|_| s3_error!(InvalidArgument, "part number {n} is not valid"))
}

fn max_keys(n: Option<i32>) -> usize {
    n.map_or(1000, |n| usize::try_from(n).unwrap_or(0))
}

/// Whether an `If-Match` / `If-None-Match` condition names `etag`.
fn condition_matches(cond: &ETagCondition, etag: &str) -> bool {
    match cond {
        ETagCondition::Any => true,
        ETagCondition::ETag(e) => bare_etag(e.value()) == etag,
    }
}

/// A GetObject body: bytes read on a blocking thread, handed over a bounded channel.
struct ObjectBody {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    remaining: usize,
}

impl Stream for ObjectBody {
    type Item = Result<Bytes, s3s::StdError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => {
                self.remaining = self.remaining.saturating_sub(b.len());
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, None)
    }
}

impl ByteStream for ObjectBody {
    fn remaining_length(&self) -> RemainingLength {
        RemainingLength::new_exact(self.remaining)
    }
}

/// Streams `[start, end)` of the object.
fn object_body(reader: ObjectReader, start: u64, end: u64) -> S3Result<StreamingBlob> {
    let len = usize::try_from(end - start)
        .map_err(|_| s3_error!(InvalidRange, "the range is too large"))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut pos = start;
        while pos < end {
            let n = (READ_BLOCK as u64).min(end - pos) as usize;
            let mut buf = vec![0u8; n];
            let r = match reader.read_range(&mut buf, pos) {
                Ok(got) if got == n => Ok(Bytes::from(buf)),
                Ok(got) => Err(std::io::Error::other(format!(
                    "object ended after {} of {} bytes",
                    pos + got as u64,
                    end
                ))),
                Err(e) => {
                    tracing::error!(error = %e, "reading an object failed");
                    Err(std::io::Error::other(e.to_string()))
                }
            };
            let failed = r.is_err();
            if tx.blocking_send(r).is_err() || failed {
                return; // client went away, or the error was passed on
            }
            pos += n as u64;
        }
    });
    Ok(StreamingBlob::new(ObjectBody { rx, remaining: len }))
}

impl OpenImsS3 {
    fn buckets(&self) -> BucketObjects {
        self.svc.buckets()
    }

    /// The caller's project: the project of the access key that signed the request.
    async fn project<T>(&self, req: &S3Request<T>) -> S3Result<ProjectId> {
        let Some(cred) = &req.credentials else {
            return Err(s3_error!(
                AccessDenied,
                "anonymous requests are not allowed"
            ));
        };
        match core(self.svc.db.lookup_key(&cred.access_key).await)? {
            Some(grant) => Ok(grant.caller.project_id),
            None => Err(s3_error!(InvalidAccessKeyId)),
        }
    }
}

#[async_trait::async_trait]
impl S3 for OpenImsS3 {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let project = self.project(&req).await?;
        let b = core(
            self.buckets()
                .create_bucket(&project, &req.input.bucket)
                .await,
        )?;
        Ok(S3Response::new(CreateBucketOutput {
            location: Some(format!("/{}", b.name)),
        }))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let project = self.project(&req).await?;
        core(
            self.buckets()
                .delete_bucket(&project, &req.input.bucket)
                .await,
        )?;
        Ok(S3Response::new(DeleteBucketOutput::default()))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        let project = self.project(&req).await?;
        core(
            self.buckets()
                .authorize(
                    &project,
                    &req.input.bucket,
                    openims_core::buckets::Action::ListBucket,
                    None,
                )
                .await,
        )?;
        Ok(S3Response::new(HeadBucketOutput {
            bucket_region: Some(self.svc.config.region.clone()),
            ..Default::default()
        }))
    }

    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let project = self.project(&req).await?;
        let prefix = req.input.prefix.clone().unwrap_or_default();
        let buckets = core(self.buckets().list_buckets(&project).await)?
            .into_iter()
            .filter(|b| b.name.starts_with(&prefix))
            .map(|b| Bucket {
                name: Some(b.name),
                creation_date: Some(timestamp(b.created_at)),
                bucket_region: Some(self.svc.config.region.clone()),
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            owner: Some(Owner {
                id: Some(project.to_string()),
                display_name: Some(project.to_string()),
            }),
            prefix: req.input.prefix,
            ..Default::default()
        }))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        let project = self.project(&req).await?;
        core(
            self.buckets()
                .authorize(
                    &project,
                    &req.input.bucket,
                    openims_core::buckets::Action::GetBucketLocation,
                    None,
                )
                .await,
        )?;
        Ok(S3Response::new(GetBucketLocationOutput {
            location_constraint: Some(BucketLocationConstraint::from(
                self.svc.config.region.clone(),
            )),
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let project = self.project(&req).await?;
        let input = req.input;
        let lr = ListRequest {
            prefix: input.prefix.clone().unwrap_or_default(),
            delimiter: input.delimiter.clone(),
            after: input.marker.clone().filter(|m| !m.is_empty()),
            max_keys: max_keys(input.max_keys),
        };
        let page = core(
            self.buckets()
                .list_objects(&project, &input.bucket, &lr)
                .await,
        )?;
        let enc = encoder(input.encoding_type.as_ref());
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: Some(enc(lr.prefix)),
            marker: Some(enc(input.marker.unwrap_or_default())),
            max_keys: input.max_keys.or(Some(1000)),
            is_truncated: Some(page.is_truncated),
            next_marker: if input.delimiter.is_some() {
                page.next_after.map(&enc)
            } else {
                None
            },
            contents: Some(objects_dto(page.objects, &enc)),
            common_prefixes: Some(prefixes_dto(page.common_prefixes, &enc)),
            delimiter: input.delimiter.map(&enc),
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let project = self.project(&req).await?;
        let input = req.input;
        let after = match &input.continuation_token {
            Some(t) => {
                let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(t)
                    .ok()
                    .and_then(|v| String::from_utf8(v).ok())
                    .ok_or_else(|| {
                        s3_error!(InvalidArgument, "The continuation token is not valid.")
                    })?;
                Some(raw)
            }
            None => input.start_after.clone().filter(|s| !s.is_empty()),
        };
        let lr = ListRequest {
            prefix: input.prefix.clone().unwrap_or_default(),
            delimiter: input.delimiter.clone(),
            after,
            max_keys: max_keys(input.max_keys),
        };
        let page = core(
            self.buckets()
                .list_objects(&project, &input.bucket, &lr)
                .await,
        )?;
        let enc = encoder(input.encoding_type.as_ref());
        let key_count = (page.objects.len() + page.common_prefixes.len()) as i32;
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(enc(lr.prefix)),
            max_keys: input.max_keys.or(Some(1000)),
            key_count: Some(key_count),
            continuation_token: input.continuation_token,
            is_truncated: Some(page.is_truncated),
            next_continuation_token: page
                .next_after
                .map(|a| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(a)),
            contents: Some(objects_dto(page.objects, &enc)),
            common_prefixes: Some(prefixes_dto(page.common_prefixes, &enc)),
            delimiter: input.delimiter.map(&enc),
            start_after: input.start_after.map(&enc),
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let project = self.project(&req).await?;
        let input = req.input;
        let if_not_exists = input
            .if_none_match
            .as_ref()
            .is_some_and(|c| matches!(c, ETagCondition::Any));
        let attrs = attrs_of(input.content_type, input.metadata);
        let body = match input.body {
            Some(b) => b,
            None => StreamingBlob::wrap(futures::stream::empty::<Result<Bytes, std::io::Error>>()),
        };
        let opts = PutOptions {
            content_length: content_length(input.content_length),
            content_md5: content_md5(input.content_md5.as_deref())?,
            if_not_exists,
        };
        let info = core(
            self.buckets()
                .put_object(&project, &input.bucket, &input.key, &attrs, body, &opts)
                .await,
        )?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(quoted(&info.etag)),
            size: Some(info.size as i64),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let project = self.project(&req).await?;
        let input = req.input;
        let reader = core(
            self.buckets()
                .open_object_reader(&project, &input.bucket, &input.key)
                .await,
        )?;
        let info = reader.info().clone();
        if let Some(c) = &input.if_match {
            if !condition_matches(c, &info.etag) {
                return Err(s3_error!(
                    PreconditionFailed,
                    "If-Match does not match the ETag"
                ));
            }
        }
        if let Some(c) = &input.if_none_match {
            if condition_matches(c, &info.etag) {
                return Err(S3Error::new(S3ErrorCode::NotModified));
            }
        }
        let (start, end, content_range) = match &input.range {
            None => (0, info.size, None),
            Some(r) => {
                let rg = r.check(info.size)?;
                let cr = format!("bytes {}-{}/{}", rg.start, rg.end - 1, info.size);
                (rg.start, rg.end, Some(cr))
            }
        };
        let body = object_body(reader, start, end)?;
        Ok(S3Response::new(GetObjectOutput {
            body: Some(body),
            accept_ranges: Some("bytes".into()),
            content_length: Some((end - start) as i64),
            content_range,
            content_type: Some(
                info.content_type
                    .clone()
                    .unwrap_or_else(|| "binary/octet-stream".into()),
            ),
            e_tag: Some(quoted(&info.etag)),
            last_modified: Some(timestamp(info.created_at)),
            metadata: metadata_of(&info),
            parts_count: parts_count(&info.etag),
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let project = self.project(&req).await?;
        let input = req.input;
        let info = core(
            self.buckets()
                .head_object(&project, &input.bucket, &input.key)
                .await,
        )?;
        if let Some(c) = &input.if_match {
            if !condition_matches(c, &info.etag) {
                return Err(s3_error!(
                    PreconditionFailed,
                    "If-Match does not match the ETag"
                ));
            }
        }
        if let Some(c) = &input.if_none_match {
            if condition_matches(c, &info.etag) {
                return Err(S3Error::new(S3ErrorCode::NotModified));
            }
        }
        Ok(S3Response::new(HeadObjectOutput {
            accept_ranges: Some("bytes".into()),
            content_length: Some(info.size as i64),
            content_type: Some(
                info.content_type
                    .clone()
                    .unwrap_or_else(|| "binary/octet-stream".into()),
            ),
            e_tag: Some(quoted(&info.etag)),
            last_modified: Some(timestamp(info.created_at)),
            metadata: metadata_of(&info),
            parts_count: parts_count(&info.etag),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let project = self.project(&req).await?;
        core(
            self.buckets()
                .delete_object(&project, &req.input.bucket, &req.input.key)
                .await,
        )?;
        Ok(S3Response::with_status(
            DeleteObjectOutput::default(),
            StatusCode::NO_CONTENT,
        ))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let project = self.project(&req).await?;
        let input = req.input;
        let quiet = input.delete.quiet.unwrap_or(false);
        let b = self.buckets();
        // The bucket must exist (a missing bucket fails the whole request, as in S3).
        if core(b.find_bucket(&input.bucket).await)?.is_none() {
            return Err(s3_error_of(CoreError::NoSuchBucket(input.bucket)));
        }
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for o in input.delete.objects {
            match b.delete_object(&project, &input.bucket, &o.key).await {
                Ok(_) => {
                    if !quiet {
                        deleted.push(DeletedObject {
                            key: Some(o.key),
                            ..Default::default()
                        });
                    }
                }
                Err(e) => {
                    let err = s3_error_of(e);
                    errors.push(Error {
                        code: Some(err.code().as_str().to_string()),
                        key: Some(o.key),
                        message: err.message().map(str::to_string),
                        ..Default::default()
                    });
                }
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: Some(errors),
            ..Default::default()
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let project = self.project(&req).await?;
        let input = req.input;
        let (src_bucket, src_key) = match &input.copy_source {
            CopySource::Bucket { bucket, key, .. } => (bucket.to_string(), key.to_string()),
            _ => {
                return Err(s3_error!(
                    NotImplemented,
                    "only bucket/key copy sources are supported"
                ))
            }
        };
        let replace = input
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        let attrs = replace.then(|| attrs_of(input.content_type, input.metadata));
        let info = core(
            self.buckets()
                .copy_object(
                    &project,
                    &src_bucket,
                    &src_key,
                    &input.bucket,
                    &input.key,
                    attrs,
                )
                .await,
        )?;
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(quoted(&info.etag)),
                last_modified: Some(timestamp(info.created_at)),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let project = self.project(&req).await?;
        let input = req.input;
        let attrs = attrs_of(input.content_type, input.metadata);
        let up = core(
            self.buckets()
                .create_upload(&project, &input.bucket, &input.key, &attrs)
                .await,
        )?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(up.upload_id),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let project = self.project(&req).await?;
        let input = req.input;
        let number = part_number(input.part_number)?;
        let body = match input.body {
            Some(b) => b,
            None => StreamingBlob::wrap(futures::stream::empty::<Result<Bytes, std::io::Error>>()),
        };
        let part = core(
            self.buckets()
                .upload_part(
                    &project,
                    &input.bucket,
                    &input.key,
                    &input.upload_id,
                    number,
                    body,
                    &PutOptions {
                        content_length: content_length(input.content_length),
                        content_md5: content_md5(input.content_md5.as_deref())?,
                        if_not_exists: false,
                    },
                )
                .await,
        )?;
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(quoted(&part.etag)),
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let project = self.project(&req).await?;
        let input = req.input;
        let if_not_exists = input
            .if_none_match
            .as_ref()
            .is_some_and(|c| matches!(c, ETagCondition::Any));
        let mut wanted = Vec::new();
        for p in input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default()
        {
            let n = p
                .part_number
                .ok_or_else(|| s3_error!(InvalidPart, "a part has no PartNumber"))?;
            wanted.push(CompletePart {
                part_number: part_number(n)?,
                etag: p.e_tag.map(|e| e.value().to_string()),
            });
        }
        let info = core(
            self.buckets()
                .complete_upload(
                    &project,
                    &input.bucket,
                    &input.key,
                    &input.upload_id,
                    &wanted,
                    if_not_exists,
                )
                .await,
        )?;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(input.bucket.clone()),
            key: Some(input.key.clone()),
            e_tag: Some(quoted(&info.etag)),
            location: Some(format!("/{}/{}", input.bucket, input.key)),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let project = self.project(&req).await?;
        let input = req.input;
        core(
            self.buckets()
                .abort_upload(&project, &input.bucket, &input.key, &input.upload_id)
                .await,
        )?;
        Ok(S3Response::with_status(
            AbortMultipartUploadOutput::default(),
            StatusCode::NO_CONTENT,
        ))
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let project = self.project(&req).await?;
        let input = req.input;
        let after = input
            .part_number_marker
            .and_then(|m| u32::try_from(m).ok())
            .unwrap_or(0);
        let max = input
            .max_parts
            .and_then(|m| usize::try_from(m).ok())
            .unwrap_or(1000)
            .min(1000);
        let (parts, truncated) = core(
            self.buckets()
                .list_parts(
                    &project,
                    &input.bucket,
                    &input.key,
                    &input.upload_id,
                    after,
                    max,
                )
                .await,
        )?;
        let next = parts.last().map(|p| p.part_number as i32);
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(input.upload_id),
            part_number_marker: input.part_number_marker,
            next_part_number_marker: next,
            max_parts: Some(max as i32),
            is_truncated: Some(truncated),
            parts: Some(
                parts
                    .into_iter()
                    .map(|p| Part {
                        part_number: Some(p.part_number as i32),
                        e_tag: Some(quoted(&p.etag)),
                        size: Some(p.size as i64),
                        last_modified: Some(timestamp(p.created_at)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let project = self.project(&req).await?;
        let input = req.input;
        let max = input
            .max_uploads
            .and_then(|m| usize::try_from(m).ok())
            .unwrap_or(1000)
            .min(1000);
        let prefix = input.prefix.clone().unwrap_or_default();
        let (uploads, truncated) = core(
            self.buckets()
                .list_uploads(
                    &project,
                    &input.bucket,
                    &prefix,
                    input.key_marker.as_deref().filter(|k| !k.is_empty()),
                    max,
                )
                .await,
        )?;
        let enc = encoder(input.encoding_type.as_ref());
        let next_key = uploads.last().map(|u| enc(u.key.clone()));
        let next_id = uploads.last().map(|u| u.upload_id.clone());
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: input.prefix.map(&enc),
            key_marker: input.key_marker.map(&enc),
            upload_id_marker: input.upload_id_marker,
            next_key_marker: next_key,
            next_upload_id_marker: next_id,
            max_uploads: Some(max as i32),
            is_truncated: Some(truncated),
            encoding_type: input.encoding_type,
            uploads: Some(
                uploads
                    .into_iter()
                    .map(|u| MultipartUpload {
                        key: Some(enc(u.key)),
                        upload_id: Some(u.upload_id),
                        initiated: Some(timestamp(u.created_at)),
                        initiator: Some(Initiator {
                            id: Some(u.project_id.to_string()),
                            display_name: Some(u.project_id.to_string()),
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    async fn put_bucket_policy(
        &self,
        req: S3Request<PutBucketPolicyInput>,
    ) -> S3Result<S3Response<PutBucketPolicyOutput>> {
        let project = self.project(&req).await?;
        core(
            self.buckets()
                .put_policy(&project, &req.input.bucket, &req.input.policy)
                .await,
        )?;
        Ok(S3Response::with_status(
            PutBucketPolicyOutput::default(),
            StatusCode::NO_CONTENT,
        ))
    }

    async fn get_bucket_policy(
        &self,
        req: S3Request<GetBucketPolicyInput>,
    ) -> S3Result<S3Response<GetBucketPolicyOutput>> {
        let project = self.project(&req).await?;
        let policy = core(self.buckets().get_policy(&project, &req.input.bucket).await)?;
        Ok(S3Response::new(GetBucketPolicyOutput {
            policy: Some(policy),
        }))
    }

    async fn delete_bucket_policy(
        &self,
        req: S3Request<DeleteBucketPolicyInput>,
    ) -> S3Result<S3Response<DeleteBucketPolicyOutput>> {
        let project = self.project(&req).await?;
        core(
            self.buckets()
                .delete_policy(&project, &req.input.bucket)
                .await,
        )?;
        Ok(S3Response::with_status(
            DeleteBucketPolicyOutput::default(),
            StatusCode::NO_CONTENT,
        ))
    }
}

/// `PartsCount` of a multipart object (from its `<md5>-<n>` ETag).
fn parts_count(etag: &str) -> Option<i32> {
    etag.rsplit_once('-').and_then(|(_, n)| n.parse().ok())
}

/// The binary MD5 of a `Content-MD5` header (base64).
fn content_md5(header: Option<&str>) -> S3Result<Option<[u8; 16]>> {
    let Some(h) = header else { return Ok(None) };
    base64::engine::general_purpose::STANDARD
        .decode(h.trim())
        .ok()
        .and_then(|v| <[u8; 16]>::try_from(v).ok())
        .map(Some)
        .ok_or_else(|| s3_error!(InvalidDigest, "Content-MD5 is not the base64 of an MD5"))
}

fn objects_dto(objects: Vec<ObjectInfo>, enc: &impl Fn(String) -> String) -> Vec<Object> {
    objects
        .into_iter()
        .map(|o| Object {
            key: Some(enc(o.key)),
            size: Some(o.size as i64),
            e_tag: Some(quoted(&o.etag)),
            last_modified: Some(timestamp(o.created_at)),
            storage_class: Some(ObjectStorageClass::from_static(
                ObjectStorageClass::STANDARD,
            )),
            ..Default::default()
        })
        .collect()
}

fn prefixes_dto(prefixes: Vec<String>, enc: &impl Fn(String) -> String) -> Vec<CommonPrefix> {
    prefixes
        .into_iter()
        .map(|p| CommonPrefix {
            prefix: Some(enc(p)),
        })
        .collect()
}
