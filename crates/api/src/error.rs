//! The one place domain errors become HTTP: status, `IMG.xxxx` code and message.
//!
//! IMS paths answer `{"error":{"code","message"}}`. Glance paths add Glance's own keys
//! (`message`, `code` like "404 Not Found", `title`) so both client families parse them.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use openims_core::CoreError;
use serde_json::json;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub glance: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            glance: false,
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "APIGW.0301", message)
    }
    pub fn forbidden_project(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "IMG.0030", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "IMG.9404", message)
    }
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "IMG.9008",
            format!("The request body exceeds the limit of {limit} bytes."),
        )
    }
    /// Answer Glance-style, with Glance's statuses where they differ from IMS's.
    pub fn glance(mut self) -> Self {
        self.glance = true;
        match self.code {
            // Glance answers 403 when the caller may see the image but not do this to it.
            "IMG.0028" | "IMG.0026" | "IMG.0047" | "IMG.0106" | "IMG.0092" | "IMG.0196" => {
                self.status = StatusCode::FORBIDDEN
            }
            "IMG.0090" | "IMG.9022" => self.status = StatusCode::CONFLICT,
            _ => {}
        }
        self
    }
}

/// Status and code of each domain error (IMS semantics).
fn classify(e: &CoreError) -> (StatusCode, &'static str) {
    use CoreError::*;
    let bad = StatusCode::BAD_REQUEST;
    match e {
        InvalidRequest(_) | InvalidAttribute { .. } => (bad, "IMG.0001"),
        EmptyBody => (bad, "IMG.0007"),
        NameMissing => (bad, "IMG.0013"),
        NameTooLong(_) => (bad, "IMG.0002"),
        NameInvalid(_) => (bad, "IMG.0003"),
        DescriptionTooLong => (bad, "IMG.0004"),
        DescriptionInvalid => (bad, "IMG.0054"),
        ImageNotFound(_) => (StatusCode::NOT_FOUND, "IMG.0027"),
        JobNotFound(_) => (StatusCode::NOT_FOUND, "IMG.9001"),
        ImageQuotaExceeded(_) => (bad, "IMG.0015"),
        TagQuotaExceeded(_) => (bad, "IMG.0116"),
        TagInvalid(_) => (bad, "IMG.0115"),
        TagNotFound(_) => (StatusCode::NOT_FOUND, "IMG.9005"),
        ImageProtected => (bad, "IMG.0028"),
        ImageNotActive(_) => (bad, "IMG.0046"),
        ImageBeingCreated => (bad, "IMG.0090"),
        WholeImageMember(_) => (bad, "IMG.9023"),
        NotOwner => (bad, "IMG.0047"),
        BadTransition { .. } => (StatusCode::CONFLICT, "IMG.9006"),
        ReadOnlyAttribute(_) => (StatusCode::FORBIDDEN, "IMG.9007"),
        ReservedAttribute(_) => (StatusCode::FORBIDDEN, "IMG.9007"),
        InvalidFirmware => (bad, "IMG.0141"),
        InvalidArchitecture => (bad, "IMG.0212"),
        InvalidOsVersion(_) => (bad, "IMG.0056"),
        InvalidDiskOrMemory(_) => (bad, "IMG.0055"),
        DuplicateImage(_) => (StatusCode::CONFLICT, "IMG.9010"),
        FormatMismatch { .. } => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "IMG.9003"),
        UnsafeImage(_) => (bad, "IMG.9004"),
        InvalidImageFile(_) => (bad, "IMG.0057"),
        ImageTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "IMG.0059"),
        FormatsNotSet => (bad, "IMG.9011"),
        DataImageUpdate => (bad, "IMG.0168"),
        Forbidden(_) => (StatusCode::FORBIDDEN, "IMG.0026"),
        FlowControl(_) => (bad, "IMG.0060"),
        KmsKeyNotFound(_) => (bad, "IMG.0095"),
        KmsKeyNotEnabled(_) => (bad, "IMG.0097"),
        KmsNoPermission(_) => (bad, "IMG.0099"),
        SameKmsKey => (bad, "IMG.0096"),
        SourceKeyNotFound(_) => (bad, "IMG.0101"),
        SourceKeyNotEnabled(_) => (bad, "IMG.0102"),
        SourceKeyNoPermission(_) => (bad, "IMG.0103"),
        BmsNoEncryption => (bad, "IMG.0118"),
        SharedEncryptedImage => (bad, "IMG.0197"),
        KmsInvalid(_) => (bad, "KMS.0201"),
        KmsBadState(_) => (StatusCode::CONFLICT, "KMS.0206"),
        NoSuchService(_) => (bad, "IMG.9002"),
        WholeImageNotReplicable => (bad, "IMG.0130"),
        IsoImage => (bad, "IMG.0167"),
        ImageTooLargeToCopy(_) => (bad, "IMG.0059"),
        UploadInterrupted(_) => (bad, "IMG.9012"),
        ProjectNameIncorrect(_) => (bad, "IMG.0145"),
        ProjectNameRequired => (bad, "IMG.0104"),
        AgencyInvalid(_) => (bad, "IMG.0179"),
        VaultNotSupported(_) => (bad, "IMG.0189"),
        SameRegion(_) => (bad, "IMG.9030"),
        UnknownRegion(_) => (bad, "IMG.9031"),
        PeerUnavailable(_) | ChunksMissing(_) => (StatusCode::BAD_GATEWAY, "IMG.9032"),
        EncryptedCrossRegion(_) => (bad, "IMG.9033"),
        NotPeerService => (StatusCode::FORBIDDEN, "IMG.9034"),
        // Bucket errors reached through the IMS API (image_url "bucket:object", exports).
        NoSuchBucket(_) | AccessDenied(_) => (bad, "IMG.0069"),
        NoSuchKey(_) | NoSuchUpload(_) | IncompleteBody(_) | BadDigest(_) => (bad, "IMG.0057"),
        ObjectExists(_) => (bad, "IMG.0070"),
        InvalidBucketName(_) => (bad, "IMG.0109"),
        InvalidObjectKey(_) => (bad, "IMG.0075"),
        EntityTooLarge(_) => (bad, "IMG.0059"),
        BadFileUrl(_) => (bad, "IMG.0017"),
        BucketNameEmpty => (bad, "IMG.0068"),
        ExportFileNameEmpty => (bad, "IMG.0073"),
        ExportFileNameTooLong(_) => (bad, "IMG.0074"),
        ExportFileNameSpaces(_) => (bad, "IMG.0175"),
        PublicImageExport => (bad, "IMG.0077"),
        WholeImageExport => (bad, "IMG.0128"),
        ExportRefused(_) => (bad, "IMG.0071"),
        UnsupportedFormat(_) => (bad, "IMG.0072"),
        ExportInProgress => (bad, "IMG.0148"),
        ExportTooLarge(_) => (bad, "IMG.0160"),
        IsoNeedsOsVersion => (bad, "IMG.0166"),
        TooManyImports(_) => (bad, "IMG.0194"),
        ObjectChanged(_) => (bad, "IMG.0057"),
        NoSuchBucketPolicy(_)
        | BucketAlreadyExists(_)
        | BucketAlreadyOwnedByYou(_)
        | BucketNotEmpty(_)
        | MalformedPolicy(_)
        | EntityTooSmall(_)
        | InvalidPart(_)
        | InvalidPartOrder(_) => (bad, "IMG.0001"),
        OwnedByOther => (bad, "IMG.0106"),
        DeleteNotOwner => (bad, "IMG.0092"),
        ShareWithSelf => (bad, "IMG.0076"),
        PublicNotShareable => (bad, "IMG.0089"),
        EncryptedNotShareable => (bad, "IMG.0098"),
        KeyNotGranted(_) => (bad, "IMG.0099"),
        MemberLimit(_) => (bad, "IMG.0088"),
        ShareNotAccepted => (bad, "IMG.0196"),
        EncryptedSharedCopy => (bad, "IMG.0197"),
        UnknownMember(_) => (bad, "IMG.0145"),
        MemberNotFound(_) => (StatusCode::NOT_FOUND, "IMG.9020"),
        MemberExists(_) => (StatusCode::CONFLICT, "IMG.9021"),
        SharedWithDomain => (bad, "IMG.9022"),
        MemberJobFailed { code, .. } => (bad, code),
        Store(_) | Format(_) | Db(_) | Migrate(_) | Io(_) | Internal(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "IMG.9000")
        }
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let (status, code) = classify(&e);
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "internal error");
            "The service failed to complete the request; see the server log for the request id."
                .to_string()
        } else {
            e.to_string()
        };
        ApiError {
            status,
            code,
            message,
            glance: false,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = if self.glance {
            json!({
                "message": self.message,
                "code": format!("{} {}", self.status.as_u16(), self.status.canonical_reason().unwrap_or("")),
                "title": self.status.canonical_reason().unwrap_or(""),
                "error": {"code": self.code, "message": self.message},
            })
        } else {
            json!({"error": {"code": self.code, "message": self.message}})
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        resp.headers_mut()
            .insert("x-openims-error-code", HeaderValue::from_static(self.code));
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
