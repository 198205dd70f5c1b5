//! The crate's one error type. Each variant is one rule of the contract; the api crate maps it
//! to an HTTP status and an `IMG.xxxx` code.

/// Everything the domain can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("The request message format is invalid: {0}")]
    InvalidRequest(String),
    #[error("The request body is empty.")]
    EmptyBody,
    #[error("The image name is not specified.")]
    NameMissing,
    #[error("The image name contains more than {0} characters.")]
    NameTooLong(usize),
    #[error("The image name format is invalid: {0}")]
    NameInvalid(String),
    #[error("The description contains more than 1024 characters.")]
    DescriptionTooLong,
    #[error("The image description format is invalid: it must not contain a carriage return, '<' or '>'.")]
    DescriptionInvalid,
    #[error("The image ID in the request does not exist: {0}")]
    ImageNotFound(String),
    #[error("The job does not exist: {0}")]
    JobNotFound(String),
    #[error("The number of private images has reached the maximum allowed ({0}).")]
    ImageQuotaExceeded(u64),
    #[error("The number of image tags exceeds the quota ({0}).")]
    TagQuotaExceeded(usize),
    #[error("The image tag is invalid: {0}")]
    TagInvalid(String),
    #[error("The tag does not exist: {0}")]
    TagNotFound(String),
    #[error("The image in the request is protected.")]
    ImageProtected,
    #[error("The image is unavailable: its status is {0}.")]
    ImageNotActive(String),
    #[error("The image being created cannot be deleted.")]
    ImageBeingCreated,
    /// A member disk of a whole image, deleted on its own (it goes with its whole image).
    #[error("The image is a disk of the full-ECS image {0}; delete the full-ECS image, which deletes its disks with it.")]
    WholeImageMember(String),
    #[error("This operation can be performed only by the image owner.")]
    NotOwner,
    #[error("Image status transition from {from} to {to} is not allowed")]
    BadTransition { from: String, to: String },
    #[error("Attribute '{0}' is read-only.")]
    ReadOnlyAttribute(String),
    #[error("Attribute '{0}' is reserved.")]
    ReservedAttribute(String),
    #[error("Invalid value for attribute '{attr}': {reason}")]
    InvalidAttribute { attr: String, reason: String },
    #[error("The value of hw_firmware_type is not uefi or bios.")]
    InvalidFirmware,
    #[error("The value of Architecture must be x86 or Arm.")]
    InvalidArchitecture,
    #[error("Invalid OS version: {0}")]
    InvalidOsVersion(String),
    #[error("The memory or disk size is invalid: {0}")]
    InvalidDiskOrMemory(String),
    #[error("The image ID already exists: {0}")]
    DuplicateImage(String),
    #[error("Image disk_format {declared} does not match stream data {detected}")]
    FormatMismatch { declared: String, detected: String },
    #[error("The image file was refused by the safety checks: {0}")]
    UnsafeImage(String),
    #[error("The image file is invalid: {0}")]
    InvalidImageFile(String),
    #[error("The size of the image file exceeds the maximum allowed ({0} bytes).")]
    ImageTooLarge(u64),
    #[error("The image must have disk_format and container_format set before data is uploaded.")]
    FormatsNotSet,
    #[error("Data disk images cannot be updated.")]
    DataImageUpdate,
    #[error("{0}")]
    Forbidden(String),
    #[error("The number of tasks exceeds the flow control limit: {0}")]
    FlowControl(String),
    #[error("The KMS key does not exist: {0}")]
    KmsKeyNotFound(String),
    #[error("The key is not enabled: {0}")]
    KmsKeyNotEnabled(String),
    #[error("You do not have the permission to access the key: {0}")]
    KmsNoPermission(String),
    #[error("The specified KMS key ID must be different from the image key ID.")]
    SameKmsKey,
    #[error("The original key does not exist: {0}")]
    SourceKeyNotFound(String),
    #[error("The original key is not enabled: {0}")]
    SourceKeyNotEnabled(String),
    #[error("You do not have the permission to access the original key: {0}")]
    SourceKeyNoPermission(String),
    #[error("The BMS image does not support KMS encryption.")]
    BmsNoEncryption,
    #[error("Failed to replicate the shared image because it is encrypted using KMS.")]
    SharedEncryptedImage,
    #[error("Invalid KMS request: {0}")]
    KmsInvalid(String),
    #[error("The key state does not allow this operation: {0}")]
    KmsBadState(String),
    #[error("This operation needs {0}, which this deployment does not provide.")]
    NoSuchService(&'static str),
    #[error("The full-ECS image cannot be exported or replicated.")]
    WholeImageNotReplicable,
    #[error("This operation cannot be performed for ISO images.")]
    IsoImage,
    #[error("The image cannot be replicated because it exceeds the size limit of {0} GB.")]
    ImageTooLargeToCopy(u64),
    #[error("The upload was interrupted: {0}")]
    UploadInterrupted(String),
    // ---- Buckets and objects (the embedded S3 endpoint; see `buckets`). ----
    #[error("The specified bucket does not exist: {0}")]
    NoSuchBucket(String),
    #[error("The specified key does not exist: {0}")]
    NoSuchKey(String),
    #[error("The specified multipart upload does not exist: {0}")]
    NoSuchUpload(String),
    #[error("The bucket has no policy: {0}")]
    NoSuchBucketPolicy(String),
    #[error("The requested bucket name is not available: {0}")]
    BucketAlreadyExists(String),
    #[error("Your project already owns the bucket: {0}")]
    BucketAlreadyOwnedByYou(String),
    #[error("The bucket you tried to delete is not empty: {0}")]
    BucketNotEmpty(String),
    #[error("The specified bucket name is not valid: {0}")]
    InvalidBucketName(String),
    #[error("The object key is not valid: {0}")]
    InvalidObjectKey(String),
    #[error("Access Denied: {0}")]
    AccessDenied(String),
    #[error("The bucket policy is malformed: {0}")]
    MalformedPolicy(String),
    #[error("A part of the upload is smaller than the minimum allowed size: {0}")]
    EntityTooSmall(String),
    #[error("The object or part exceeds the maximum allowed size ({0} bytes).")]
    EntityTooLarge(u64),
    #[error(
        "One or more of the specified parts could not be found or its ETag did not match: {0}"
    )]
    InvalidPart(String),
    #[error("The list of parts was not in ascending order: {0}")]
    InvalidPartOrder(String),
    #[error("The object already exists: {0}")]
    ObjectExists(String),
    #[error("The Content-MD5 you specified did not match what was received: {0}")]
    BadDigest(String),
    #[error("The request body is shorter or longer than its declared length: {0}")]
    IncompleteBody(String),
    #[error("This operation can be performed only by the image owner: the image owner is another tenant.")]
    OwnedByOther,
    #[error("The image can only be deleted by the owner.")]
    DeleteNotOwner,
    #[error("You cannot share an image with yourself.")]
    ShareWithSelf,
    #[error("The public image cannot be shared.")]
    PublicNotShareable,
    #[error("The encrypted image cannot be shared: it is encrypted with a default key, or its key is unknown to the key service.")]
    EncryptedNotShareable,
    #[error("You do not have the permission to access the key: key {0} is not granted to the recipient.")]
    KeyNotGranted(String),
    #[error("The number of shared images has reached the maximum allowed: an image may have at most {0} members.")]
    MemberLimit(usize),
    #[error("The image cannot be used (downloaded or replicated) because the share is not accepted by the recipient.")]
    ShareNotAccepted,
    #[error("Failed to replicate the shared image because it is encrypted using KMS: give a key of your own (cmk_id) to re-key it.")]
    EncryptedSharedCopy,
    #[error("The project or domain does not exist: {0}")]
    UnknownMember(String),
    #[error("The member does not exist: {0}")]
    MemberNotFound(String),
    #[error("The member already exists: {0}")]
    MemberExists(String),
    #[error(
        "The image is shared with a domain and cannot be deleted; remove the domain members first."
    )]
    SharedWithDomain,
    #[error("{failed} of {total} member operations failed; see entities.results.")]
    MemberJobFailed {
        code: &'static str,
        failed: usize,
        total: usize,
    },
    // ---- Import from and export to bucket objects (see `import`, `export`). ----
    #[error("The URL format is incorrect: {0}")]
    BadFileUrl(String),
    #[error("The specified bucket name is empty.")]
    BucketNameEmpty,
    #[error("The name of the exported file is empty.")]
    ExportFileNameEmpty,
    #[error("The file name length exceeds the limit of {0} bytes.")]
    ExportFileNameTooLong(usize),
    #[error("The folder name and image file name cannot contain spaces: {0}")]
    ExportFileNameSpaces(String),
    #[error("The public image cannot be exported.")]
    PublicImageExport,
    #[error("The full-ECS image cannot be exported.")]
    WholeImageExport,
    #[error("The image cannot be exported: {0}")]
    ExportRefused(String),
    #[error("The specified image format is not supported: {0}")]
    UnsupportedFormat(String),
    #[error("The image is being exported.")]
    ExportInProgress,
    #[error("Only images less than {0} GB can be exported.")]
    ExportTooLarge(u64),
    #[error(
        "OS information must be contained in the ISO files used to create images: set os_version."
    )]
    IsoNeedsOsVersion,
    #[error(
        "The maximum number of images that can be imported at one time has been reached ({0})."
    )]
    TooManyImports(u64),
    #[error("The image file changed while it was being imported: {0}")]
    ObjectChanged(String),
    // ---- cross-region replication (spec C.2) ----
    #[error("The project name is incorrect: no project {0:?} of your account exists in the target region.")]
    ProjectNameIncorrect(String),
    #[error("Enter the project name if there are multiple projects in the same region.")]
    ProjectNameRequired,
    #[error("The token of the source image agency is invalid: {0}")]
    AgencyInvalid(String),
    #[error("The target CBR vault does not support image replication: {0}")]
    VaultNotSupported(String),
    #[error("The destination region must differ from the source region ({0}).")]
    SameRegion(String),
    #[error("The region {0:?} is not a peer of this deployment.")]
    UnknownRegion(String),
    #[error("The peer region could not complete the request: {0}")]
    PeerUnavailable(String),
    #[error("An encrypted image can be replicated to another region only with a key of the target region (cmk_id): {0}")]
    EncryptedCrossRegion(String),
    #[error("The caller is not a peer service account of this deployment.")]
    NotPeerService,
    #[error("Chunks referenced by the manifest have not been received: {0} missing")]
    ChunksMissing(usize),
    #[error("storage error: {0}")]
    Store(#[from] openims_store::StoreError),
    #[error("image format error: {0}")]
    Format(#[from] openims_format::FormatError),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
