//! The named reasons an image file is refused.

use crate::DiskFormat;

/// One failed safety check. Each variant has a stable machine name ([`Violation::name`], e.g.
/// `qcow2.backing_file`) and a human message (its `Display`).
///
/// Names are part of the public contract (API error details, the hostile corpus manifest):
/// never rename one; add new variants instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    // ---- any format -------------------------------------------------------------------------
    /// The content matches more than one format (polyglot / format confusion).
    #[error("file matches several formats ({}): refusing ambiguous content", join(.formats))]
    MultipleFormats { formats: Vec<String> },
    /// The caller declared one format and the content is another.
    #[error("declared format {declared} but the content is {detected}")]
    DeclaredFormatMismatch {
        declared: DiskFormat,
        detected: DiskFormat,
    },
    /// A structure the header points to extends past the end of the file.
    #[error("{format} image is truncated: needs {needed} bytes, file has {file_size}")]
    Truncated {
        format: DiskFormat,
        needed: u64,
        file_size: u64,
    },
    /// The virtual disk size is zero.
    #[error("virtual size is 0")]
    VirtualSizeZero,
    /// The virtual disk size is over the configured limit.
    #[error("virtual size {size} exceeds the limit of {max} bytes")]
    VirtualSizeTooLarge { size: u64, max: u64 },
    /// A header field is structurally invalid.
    #[error("invalid {format} header: {reason}")]
    InvalidHeader { format: DiskFormat, reason: String },
    /// The file carries the signature of an image format this service does not accept
    /// (bochs, parallels, cloop, dmg, vmdk3 ...) that qemu would otherwise interpret.
    #[error("file looks like a {name} image, which is not accepted")]
    ForeignFormat { name: String },

    // ---- qcow / luks -----------------------------------------------------------------------
    /// Legacy qcow version 1.
    #[error("legacy qcow (version 1) images are not accepted")]
    QcowLegacy,
    /// LUKS encrypted container.
    #[error("LUKS encrypted containers are not accepted")]
    LuksEncrypted,

    // ---- qcow2 ------------------------------------------------------------------------------
    /// qcow2 version other than 2 or 3.
    #[error("unsupported qcow2 version {version}")]
    Qcow2UnsupportedVersion { version: u32 },
    /// The image has a backing file (would read a host or other file).
    #[error("qcow2 image has a backing file{}", show_name(.name))]
    Qcow2BackingFile { name: Option<String> },
    /// The image stores its data in an external data file.
    #[error("qcow2 image uses an external data file{}", show_name(.name))]
    Qcow2DataFile { name: Option<String> },
    /// Incompatible feature bits this code does not know.
    #[error("qcow2 image has unknown incompatible features {bits:#x}")]
    Qcow2UnknownIncompatibleFeatures { bits: u64 },
    /// The image is marked corrupt by qemu.
    #[error("qcow2 image is marked corrupt")]
    Qcow2Corrupt,
    /// The image is encrypted (legacy AES or LUKS-in-qcow2).
    #[error("qcow2 image is encrypted (crypt_method {method})")]
    Qcow2Encrypted { method: u32 },
    /// cluster_bits outside 9..=21.
    #[error("qcow2 cluster_bits {bits} out of range 9..=21")]
    Qcow2BadClusterBits { bits: u32 },
    /// header_length inconsistent with version, alignment or cluster size.
    #[error("qcow2 header_length {length} is invalid")]
    Qcow2BadHeaderLength { length: u32 },
    /// A header extension is malformed or runs past the header cluster.
    #[error("qcow2 header extension invalid: {reason}")]
    Qcow2BadHeaderExtension { reason: String },
    /// Unknown compression type.
    #[error("qcow2 compression type {ctype} is unknown")]
    Qcow2UnknownCompressionType { ctype: u8 },
    /// A metadata table (L1, refcount, snapshot, bitmap directory) lies outside the file.
    #[error("qcow2 {table} table at {offset:#x} (+{len} bytes) lies outside the file")]
    Qcow2TableOutOfBounds {
        table: &'static str,
        offset: u64,
        len: u64,
    },
    /// A metadata table offset is not cluster aligned.
    #[error("qcow2 {table} table offset {offset:#x} is not cluster aligned")]
    Qcow2TableUnaligned { table: &'static str, offset: u64 },
    /// A metadata table is bigger than qemu's own limits.
    #[error("qcow2 {table} table has {entries} entries, over the limit")]
    Qcow2TableTooLarge { table: &'static str, entries: u64 },
    /// The L1 table cannot cover the virtual size.
    #[error("qcow2 L1 table has {l1_size} entries but {needed} are needed")]
    Qcow2L1TooSmall { l1_size: u64, needed: u64 },
    /// The image has internal snapshots (refused: hidden content, shared clusters).
    #[error("qcow2 image has {count} internal snapshots")]
    Qcow2Snapshots { count: u32 },
    /// An L1 entry points outside the file, is unaligned or has reserved bits (deep).
    #[error("qcow2 L1 entry {index} ({entry:#x}) is invalid or points outside the file")]
    Qcow2L1EntryOutOfBounds { index: u64, entry: u64 },
    /// Two L1 entries share one L2 table (only legal with snapshots) (deep).
    #[error("qcow2 L2 table at {offset:#x} is referenced more than once")]
    Qcow2L2TableShared { offset: u64 },
    /// An L2 entry points outside the file, is unaligned or has reserved bits (deep).
    #[error("qcow2 L2 entry for guest offset {guest_offset:#x} ({entry:#x}) is invalid or outside the file")]
    Qcow2L2EntryOutOfBounds { guest_offset: u64, entry: u64 },
    /// A compressed cluster descriptor points outside the file (deep).
    #[error("qcow2 compressed cluster for guest offset {guest_offset:#x} lies outside the file")]
    Qcow2CompressedClusterOutOfBounds { guest_offset: u64 },
    /// Compressed clusters expand far more than their file could hold (deep).
    #[error("qcow2 compressed clusters expand to {expanded} bytes from a {file_size}-byte file (ratio limit {max_ratio})")]
    Qcow2CompressionBomb {
        expanded: u64,
        file_size: u64,
        max_ratio: u64,
    },

    // ---- vmdk -------------------------------------------------------------------------------
    /// Sparse extent version other than 1..=3, or VMDK3 (COWD).
    #[error("unsupported vmdk version {version}")]
    VmdkUnsupportedVersion { version: u32 },
    /// No embedded descriptor.
    #[error("vmdk image has no embedded descriptor")]
    VmdkMissingDescriptor,
    /// The file is a text descriptor only: its data lives in other files.
    #[error("vmdk descriptor file without data (extents live in other files)")]
    VmdkDescriptorOnly,
    /// Embedded descriptor lies outside the file or is too large.
    #[error("vmdk descriptor at {offset:#x} (+{len} bytes) lies outside the file or is too large")]
    VmdkDescriptorOutOfBounds { offset: u64, len: u64 },
    /// The descriptor cannot be parsed.
    #[error("vmdk descriptor invalid: {reason}")]
    VmdkInvalidDescriptor { reason: String },
    /// createType other than monolithicSparse / streamOptimized.
    #[error(
        "vmdk createType {create_type:?} is not accepted (only monolithicSparse, streamOptimized)"
    )]
    VmdkUnsupportedCreateType { create_type: String },
    /// An extent that is not a sparse extent inside this file (FLAT, VMFS, ZERO ...).
    #[error("vmdk extent {line:?} refers to data outside this file")]
    VmdkExternalExtent { line: String },
    /// An extent file name with a path (absolute or relative) or otherwise unsafe characters.
    #[error("vmdk extent file name {file:?} contains a path")]
    VmdkExtentPath { file: String },
    /// More (or fewer) than one extent.
    #[error("vmdk descriptor has {count} extents, exactly 1 is accepted")]
    VmdkExtentCount { count: usize },
    /// A parent (delta disk): parentCID set or parentFileNameHint present.
    #[error("vmdk image has a parent disk (backing file)")]
    VmdkParent,
    /// Grain size not a power of two in 1..=2048 sectors, or bad GTEs per GT.
    #[error("vmdk grain geometry invalid: {reason}")]
    VmdkBadGrainSize { reason: String },
    /// Unknown compression algorithm.
    #[error("vmdk compression algorithm {algorithm} is unknown")]
    VmdkUnknownCompression { algorithm: u16 },
    /// The grain directory lies outside the file.
    #[error("vmdk grain directory at {offset:#x} (+{len} bytes) lies outside the file")]
    VmdkGrainDirectoryOutOfBounds { offset: u64, len: u64 },
    /// A grain table lies outside the file or is shared (deep).
    #[error("vmdk grain table {index} at {offset:#x} lies outside the file or is shared")]
    VmdkGrainTableOutOfBounds { index: u64, offset: u64 },
    /// A grain lies outside the file (deep).
    #[error("vmdk grain for guest offset {guest_offset:#x} lies outside the file")]
    VmdkGrainOutOfBounds { guest_offset: u64 },
    /// streamOptimized footer / end-of-stream marker invalid or inconsistent with the header.
    #[error("vmdk footer invalid: {reason}")]
    VmdkBadFooter { reason: String },
    /// Compressed grains expand far more than their file could hold (deep).
    #[error("vmdk compressed grains expand to {expanded} bytes from a {file_size}-byte file (ratio limit {max_ratio})")]
    VmdkCompressionBomb {
        expanded: u64,
        file_size: u64,
        max_ratio: u64,
    },

    // ---- vhd --------------------------------------------------------------------------------
    /// The footer checksum does not match.
    #[error("vhd footer checksum {stored:#x} does not match computed {computed:#x}")]
    VhdBadFooterChecksum { stored: u32, computed: u32 },
    /// The dynamic disk header checksum does not match.
    #[error("vhd dynamic header checksum {stored:#x} does not match computed {computed:#x}")]
    VhdBadDynamicHeaderChecksum { stored: u32, computed: u32 },
    /// The footer copy at the start differs from the footer at the end.
    #[error("vhd footer copy at the start of the file differs from the footer at the end")]
    VhdFooterMismatch,
    /// Differencing disk (has a parent = backing file).
    #[error("vhd differencing disk (has a parent image)")]
    VhdDifferencing,
    /// Disk type other than fixed (2), dynamic (3), differencing (4).
    #[error("vhd disk type {disk_type} is not supported")]
    VhdUnsupportedDiskType { disk_type: u32 },
    /// The dynamic header lies outside the file.
    #[error("vhd dynamic header at {offset:#x} lies outside the file")]
    VhdDynamicHeaderOutOfBounds { offset: u64 },
    /// The BAT lies outside the file or does not cover the disk.
    #[error("vhd block allocation table at {offset:#x} ({entries} entries) is outside the file or too small")]
    VhdBatOutOfBounds { offset: u64, entries: u64 },
    /// Block size not a power of two of at least 512 bytes, or absurd.
    #[error("vhd block size {block_size} is invalid")]
    VhdBadBlockSize { block_size: u32 },
    /// A BAT entry points outside the file (deep).
    #[error("vhd block {index} at sector {sector:#x} lies outside the file")]
    VhdBlockOutOfBounds { index: u64, sector: u32 },
    /// Fixed disk whose data area is shorter than its declared size.
    #[error("vhd fixed disk declares {declared} bytes but holds {actual}")]
    VhdSizeMismatch { declared: u64, actual: u64 },

    // ---- vhdx -------------------------------------------------------------------------------
    /// No header with a valid CRC-32C.
    #[error("vhdx has no header with a valid checksum")]
    VhdxBadHeaderChecksum,
    /// No region table with a valid CRC-32C.
    #[error("vhdx has no region table with a valid checksum")]
    VhdxBadRegionTableChecksum,
    /// The log is not empty: qemu would replay (write) it.
    #[error("vhdx log is not empty (needs replay)")]
    VhdxLogNotEmpty,
    /// Differencing disk (parent locator or has_parent flag).
    #[error("vhdx differencing disk (has a parent locator)")]
    VhdxDifferencing,
    /// A region or metadata item lies outside the file or overlaps the headers.
    #[error("vhdx {what} at {offset:#x} (+{len} bytes) lies outside the file")]
    VhdxRegionOutOfBounds {
        what: &'static str,
        offset: u64,
        len: u64,
    },
    /// A region marked required that this code does not know.
    #[error("vhdx has unknown required region {guid}")]
    VhdxUnknownRequiredRegion { guid: String },
    /// A metadata item marked required that this code does not know.
    #[error("vhdx has unknown required metadata item {guid}")]
    VhdxUnknownRequiredMetadata { guid: String },
    /// Metadata missing or invalid (block size, sector size, virtual size).
    #[error("vhdx metadata invalid: {reason}")]
    VhdxBadMetadata { reason: String },
    /// The BAT region is too small for the disk.
    #[error("vhdx BAT holds {have} entries but {needed} are needed")]
    VhdxBatTooSmall { have: u64, needed: u64 },
    /// A payload block lies outside the file or a BAT entry is invalid (deep).
    #[error("vhdx BAT entry {index} ({entry:#x}) is invalid or points outside the file")]
    VhdxBlockOutOfBounds { index: u64, entry: u64 },

    // ---- qed --------------------------------------------------------------------------------
    /// Backing file.
    #[error("qed image has a backing file")]
    QedBackingFile,
    /// Unknown feature bits.
    #[error("qed image has unknown features {bits:#x}")]
    QedUnknownFeatures { bits: u64 },
    /// Cluster size / table size / header size invalid.
    #[error("qed geometry invalid: {reason}")]
    QedBadGeometry { reason: String },
    /// L1 table outside the file, or an L1/L2 entry pointing outside it (deep).
    #[error("qed {what} at {offset:#x} lies outside the file or is unaligned")]
    QedTableOutOfBounds { what: &'static str, offset: u64 },

    // ---- vdi --------------------------------------------------------------------------------
    /// Version other than 1.1.
    #[error("unsupported vdi version {version:#x}")]
    VdiUnsupportedVersion { version: u32 },
    /// Image type other than dynamic (1) or static (2): undo/differencing.
    #[error("vdi image type {image_type} (undo/differencing) is not accepted")]
    VdiDifferencing { image_type: u32 },
    /// Block / sector geometry invalid.
    #[error("vdi geometry invalid: {reason}")]
    VdiBadGeometry { reason: String },
    /// Block map outside the file.
    #[error("vdi block map at {offset:#x} ({entries} entries) lies outside the file")]
    VdiBlockMapOutOfBounds { offset: u64, entries: u64 },
    /// A block map entry points outside the data area / file (deep).
    #[error("vdi block map entry {index} ({entry:#x}) points outside the file")]
    VdiBlockOutOfBounds { index: u64, entry: u32 },
}

fn join(v: &[String]) -> String {
    v.join(", ")
}

fn show_name(n: &Option<String>) -> String {
    match n {
        Some(s) => format!(" ({s:?})"),
        None => String::new(),
    }
}

impl Violation {
    /// Stable machine-readable name, `<format>.<check>` (e.g. `qcow2.backing_file`).
    pub fn name(&self) -> &'static str {
        use Violation::*;
        match self {
            MultipleFormats { .. } => "image.multiple_formats",
            DeclaredFormatMismatch { .. } => "image.declared_format_mismatch",
            Truncated { .. } => "image.truncated",
            VirtualSizeZero => "image.virtual_size_zero",
            VirtualSizeTooLarge { .. } => "image.virtual_size_too_large",
            InvalidHeader { .. } => "image.invalid_header",
            ForeignFormat { .. } => "image.foreign_format",
            QcowLegacy => "qcow.legacy_format",
            LuksEncrypted => "luks.encrypted",
            Qcow2UnsupportedVersion { .. } => "qcow2.unsupported_version",
            Qcow2BackingFile { .. } => "qcow2.backing_file",
            Qcow2DataFile { .. } => "qcow2.data_file",
            Qcow2UnknownIncompatibleFeatures { .. } => "qcow2.unknown_incompatible_features",
            Qcow2Corrupt => "qcow2.corrupt",
            Qcow2Encrypted { .. } => "qcow2.encrypted",
            Qcow2BadClusterBits { .. } => "qcow2.bad_cluster_bits",
            Qcow2BadHeaderLength { .. } => "qcow2.bad_header_length",
            Qcow2BadHeaderExtension { .. } => "qcow2.bad_header_extension",
            Qcow2UnknownCompressionType { .. } => "qcow2.unknown_compression_type",
            Qcow2TableOutOfBounds { .. } => "qcow2.table_out_of_bounds",
            Qcow2TableUnaligned { .. } => "qcow2.table_unaligned",
            Qcow2TableTooLarge { .. } => "qcow2.table_too_large",
            Qcow2L1TooSmall { .. } => "qcow2.l1_too_small",
            Qcow2Snapshots { .. } => "qcow2.snapshots",
            Qcow2L1EntryOutOfBounds { .. } => "qcow2.l1_entry_out_of_bounds",
            Qcow2L2TableShared { .. } => "qcow2.l2_table_shared",
            Qcow2L2EntryOutOfBounds { .. } => "qcow2.l2_entry_out_of_bounds",
            Qcow2CompressedClusterOutOfBounds { .. } => "qcow2.compressed_cluster_out_of_bounds",
            Qcow2CompressionBomb { .. } => "qcow2.compression_bomb",
            VmdkUnsupportedVersion { .. } => "vmdk.unsupported_version",
            VmdkMissingDescriptor => "vmdk.missing_descriptor",
            VmdkDescriptorOnly => "vmdk.descriptor_only",
            VmdkDescriptorOutOfBounds { .. } => "vmdk.descriptor_out_of_bounds",
            VmdkInvalidDescriptor { .. } => "vmdk.invalid_descriptor",
            VmdkUnsupportedCreateType { .. } => "vmdk.unsupported_create_type",
            VmdkExternalExtent { .. } => "vmdk.external_extent",
            VmdkExtentPath { .. } => "vmdk.extent_path",
            VmdkExtentCount { .. } => "vmdk.extent_count",
            VmdkParent => "vmdk.parent",
            VmdkBadGrainSize { .. } => "vmdk.bad_grain_size",
            VmdkUnknownCompression { .. } => "vmdk.unknown_compression",
            VmdkGrainDirectoryOutOfBounds { .. } => "vmdk.grain_directory_out_of_bounds",
            VmdkGrainTableOutOfBounds { .. } => "vmdk.grain_table_out_of_bounds",
            VmdkGrainOutOfBounds { .. } => "vmdk.grain_out_of_bounds",
            VmdkBadFooter { .. } => "vmdk.bad_footer",
            VmdkCompressionBomb { .. } => "vmdk.compression_bomb",
            VhdBadFooterChecksum { .. } => "vhd.bad_footer_checksum",
            VhdBadDynamicHeaderChecksum { .. } => "vhd.bad_dynamic_header_checksum",
            VhdFooterMismatch => "vhd.footer_mismatch",
            VhdDifferencing => "vhd.differencing",
            VhdUnsupportedDiskType { .. } => "vhd.unsupported_disk_type",
            VhdDynamicHeaderOutOfBounds { .. } => "vhd.dynamic_header_out_of_bounds",
            VhdBatOutOfBounds { .. } => "vhd.bat_out_of_bounds",
            VhdBadBlockSize { .. } => "vhd.bad_block_size",
            VhdBlockOutOfBounds { .. } => "vhd.block_out_of_bounds",
            VhdSizeMismatch { .. } => "vhd.size_mismatch",
            VhdxBadHeaderChecksum => "vhdx.bad_header_checksum",
            VhdxBadRegionTableChecksum => "vhdx.bad_region_table_checksum",
            VhdxLogNotEmpty => "vhdx.log_not_empty",
            VhdxDifferencing => "vhdx.differencing",
            VhdxRegionOutOfBounds { .. } => "vhdx.region_out_of_bounds",
            VhdxUnknownRequiredRegion { .. } => "vhdx.unknown_required_region",
            VhdxUnknownRequiredMetadata { .. } => "vhdx.unknown_required_metadata",
            VhdxBadMetadata { .. } => "vhdx.bad_metadata",
            VhdxBatTooSmall { .. } => "vhdx.bat_too_small",
            VhdxBlockOutOfBounds { .. } => "vhdx.block_out_of_bounds",
            QedBackingFile => "qed.backing_file",
            QedUnknownFeatures { .. } => "qed.unknown_features",
            QedBadGeometry { .. } => "qed.bad_geometry",
            QedTableOutOfBounds { .. } => "qed.table_out_of_bounds",
            VdiUnsupportedVersion { .. } => "vdi.unsupported_version",
            VdiDifferencing { .. } => "vdi.differencing",
            VdiBadGeometry { .. } => "vdi.bad_geometry",
            VdiBlockMapOutOfBounds { .. } => "vdi.block_map_out_of_bounds",
            VdiBlockOutOfBounds { .. } => "vdi.block_out_of_bounds",
        }
    }
}

impl serde::Serialize for Violation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Violation", 2)?;
        st.serialize_field("name", self.name())?;
        st.serialize_field("message", &self.to_string())?;
        st.end()
    }
}
