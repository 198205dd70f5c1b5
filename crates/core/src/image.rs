//! Images: the attribute model, its validation rules, the flat attribute view both APIs
//! render, list filtering/sorting/paging, and the repository queries behind them.

use crate::db::{Db, RowExt};
use crate::error::{CoreError, Result};
use crate::ids::{ImageId, ProjectId};
use crate::members::Access;
use crate::time::{fmt_seconds, now_ms, parse_time};
use serde_json::{json, Map, Value};
use std::cmp::Ordering;

/// The image state machine (spec B.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageStatus {
    /// Metadata exists, waiting for data.
    Queued,
    /// Data is being written.
    Saving,
    /// Every byte is durably stored and verified.
    Active,
    /// Data could not be stored.
    Killed,
}

impl ImageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageStatus::Queued => "queued",
            ImageStatus::Saving => "saving",
            ImageStatus::Active => "active",
            ImageStatus::Killed => "killed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => ImageStatus::Queued,
            "saving" => ImageStatus::Saving,
            "active" => ImageStatus::Active,
            "killed" => ImageStatus::Killed,
            _ => return None,
        })
    }
}

/// How an image came to be; rules depend on it (ISO and whole images cannot be copied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Created by `POST /v2/images` (metadata first, data by upload or register).
    Metadata,
    /// Imported from an image file (system or data disk).
    File,
    /// Imported from an ISO file.
    Iso,
    /// Replicated from another image.
    Copy,
    /// A full-ECS (whole) image built from several disks.
    Whole,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Metadata => "metadata",
            Origin::File => "file",
            Origin::Iso => "iso",
            Origin::Copy => "copy",
            Origin::Whole => "whole",
        }
    }
    pub fn parse(s: &str) -> Origin {
        match s {
            "file" => Origin::File,
            "iso" => Origin::Iso,
            "copy" => Origin::Copy,
            "whole" => Origin::Whole,
            _ => Origin::Metadata,
        }
    }
}

/// Disk formats an image may be declared with (Glance's list plus Huawei's zvhd/zvhd2).
pub const DISK_FORMATS: &[&str] = &[
    "ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop", "zvhd",
    "zvhd2",
];
/// Container formats (Glance's list).
pub const CONTAINER_FORMATS: &[&str] = &[
    "ami",
    "ari",
    "aki",
    "bare",
    "ovf",
    "ova",
    "docker",
    "compressed",
];

/// One image with everything the service knows about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub id: ImageId,
    pub owner: ProjectId,
    pub name: Option<String>,
    pub status: ImageStatus,
    pub visibility: String,
    pub protected: bool,
    pub disk_format: Option<String>,
    pub container_format: Option<String>,
    pub min_disk: i64,
    pub min_ram: i64,
    pub size: Option<i64>,
    pub virtual_size: Option<i64>,
    pub checksum: Option<String>,
    pub os_hash_algo: Option<String>,
    pub os_hash_value: Option<String>,
    pub disk_manifest: Option<String>,
    pub file_manifest: Option<String>,
    pub origin: Origin,
    /// Every other attribute: `__*` attributes and custom properties (string values, except
    /// where the contract says otherwise).
    pub properties: Map<String, Value>,
    /// Tags as (key, value); a Glance tag has an empty value.
    pub tags: Vec<(String, String)>,
    pub created_at: i64,
    pub updated_at: i64,
    pub active_at: Option<i64>,
    /// How the caller who loaded the image relates to it (not stored; set by the access
    /// checks). A member sees the image as `__imagetype: shared`, `visibility: shared`.
    pub access: Access,
    /// The image has members (not stored): its owner sees `visibility: shared`.
    pub shared_out: bool,
}

/// Attributes computed by the service that callers may not set through PATCH.
pub const READ_ONLY: &[&str] = &[
    "id",
    "status",
    "checksum",
    "os_hash_algo",
    "os_hash_value",
    "size",
    "virtual_size",
    "created_at",
    "updated_at",
    "file",
    "self",
    "schema",
    "owner",
    "direct_url",
    "locations",
    "stores",
    "active_at",
    "__image_size",
    "__imagetype",
    "__isregistered",
    "__image_source_type",
    "__system__cmkid",
    "__root_origin",
    "__originalimagename",
    "__data_origin",
    "__whole_image",
    "__whole_image_disks",
    "__whole_image_id",
    "__os_type",
    "__os_bit",
    "__platform",
    "__disk_digest",
    "__source_format",
];

impl Image {
    /// A new image row in `queued`, owned by `owner`, with the IMS defaults.
    pub fn new(owner: ProjectId, name: Option<String>, origin: Origin) -> Image {
        let now = now_ms();
        let mut properties = Map::new();
        for (k, v) in [
            ("__imagetype", "private"),
            ("__isregistered", "true"),
            ("__image_source_type", "uds"),
            ("virtual_env_type", "FusionCompute"),
            ("__description", ""),
        ] {
            properties.insert(k.into(), Value::String(v.into()));
        }
        let mut img = Image {
            id: ImageId::generate(),
            owner,
            name,
            status: ImageStatus::Queued,
            visibility: "private".into(),
            protected: false,
            disk_format: None,
            container_format: None,
            min_disk: 0,
            min_ram: 0,
            size: None,
            virtual_size: None,
            checksum: None,
            os_hash_algo: None,
            os_hash_value: None,
            disk_manifest: None,
            file_manifest: None,
            origin,
            properties,
            tags: Vec::new(),
            created_at: now,
            updated_at: now,
            active_at: None,
            access: Access::Owner,
            shared_out: false,
        };
        img.set_os_version(crate::image::DEFAULT_OS_VERSION)
            .expect("the default OS version is in the catalogue");
        img
    }

    pub fn prop(&self, key: &str) -> Option<&str> {
        self.properties.get(key).and_then(|v| v.as_str())
    }

    /// Sets `__os_version` and the attributes derived from it.
    pub fn set_os_version(&mut self, v: &str) -> Result<()> {
        let os = find_os_version(v).ok_or_else(|| CoreError::InvalidOsVersion(v.to_string()))?;
        for (k, val) in [
            ("__os_version", os.os_version.to_string()),
            ("__os_type", os.os_type.to_string()),
            ("__os_bit", os.os_bit.to_string()),
            ("__platform", os.platform.to_string()),
        ] {
            self.properties.insert(k.into(), Value::String(val));
        }
        Ok(())
    }

    pub fn is_iso(&self) -> bool {
        self.origin == Origin::Iso
            || self.disk_format.as_deref() == Some("iso")
            || self.prop("virtual_env_type") == Some("IsoImage")
    }

    pub fn is_whole(&self) -> bool {
        self.origin == Origin::Whole
    }

    pub fn is_data_image(&self) -> bool {
        self.prop("virtual_env_type") == Some("DataImage")
    }

    /// Tags as Glance and `ImageInfo.tags` show them: `key` or `key=value`.
    pub fn tag_strings(&self) -> Vec<String> {
        self.tags
            .iter()
            .map(|(k, v)| {
                if v.is_empty() {
                    k.clone()
                } else {
                    format!("{k}={v}")
                }
            })
            .collect()
    }

    /// The flat attribute view shared by IMS and Glance (`ImageInfo` / Glance image).
    pub fn view(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let id = self.id.to_string();
        m.insert("id".into(), json!(id));
        m.insert("name".into(), json!(self.name));
        m.insert("status".into(), json!(self.status.as_str()));
        m.insert("visibility".into(), json!(self.visibility));
        m.insert("owner".into(), json!(self.owner.as_str()));
        m.insert("protected".into(), json!(self.protected));
        m.insert("os_hidden".into(), json!(false));
        m.insert("disk_format".into(), json!(self.disk_format));
        m.insert("container_format".into(), json!(self.container_format));
        m.insert("min_disk".into(), json!(self.min_disk));
        m.insert("min_ram".into(), json!(self.min_ram));
        m.insert("size".into(), json!(self.size));
        m.insert("virtual_size".into(), json!(self.virtual_size));
        m.insert("checksum".into(), json!(self.checksum));
        m.insert("os_hash_algo".into(), json!(self.os_hash_algo));
        m.insert("os_hash_value".into(), json!(self.os_hash_value));
        m.insert("tags".into(), json!(self.tag_strings()));
        m.insert("created_at".into(), json!(fmt_seconds(self.created_at)));
        m.insert("updated_at".into(), json!(fmt_seconds(self.updated_at)));
        m.insert(
            "active_at".into(),
            json!(self.active_at.map(fmt_seconds).unwrap_or_default()),
        );
        m.insert("self".into(), json!(format!("/v2/images/{id}")));
        m.insert("file".into(), json!(format!("/v2/images/{id}/file")));
        m.insert("schema".into(), json!("/v2/schemas/image"));
        if self.status == ImageStatus::Active {
            m.insert("stores".into(), json!("fs"));
        }
        for (k, v) in &self.properties {
            m.insert(k.clone(), v.clone());
        }
        match self.access {
            Access::Member(_) => {
                m.insert("visibility".into(), json!("shared"));
                m.insert("__imagetype".into(), json!("shared"));
            }
            Access::Owner if self.shared_out => {
                m.insert("visibility".into(), json!("shared"));
            }
            Access::Owner => {}
        }
        m.insert(
            "__image_size".into(),
            json!(self.size.unwrap_or(0).to_string()),
        );
        if let Some(ms) = self.properties.get("max_ram") {
            m.insert("max_ram".into(), json!(value_string(ms)));
        }
        m
    }
}

/// A JSON value as the string a filter compares against.
pub fn value_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Validation rules
// ---------------------------------------------------------------------------------------------

/// IMS image name rule: 1-128 characters, letters (any script), digits, `-`, `.`, `_`, space;
/// no leading or trailing space.
pub fn validate_ims_name(name: &str) -> Result<()> {
    let n = name.chars().count();
    if n == 0 {
        return Err(CoreError::NameMissing);
    }
    if n > 128 {
        return Err(CoreError::NameTooLong(128));
    }
    if name.starts_with(' ') || name.ends_with(' ') {
        return Err(CoreError::NameInvalid(
            "the first and last character cannot be a space".into(),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '-' | '.' | '_' | ' ')))
    {
        return Err(CoreError::NameInvalid(format!(
            "character {c:?} is not allowed (letters, digits, '-', '.', '_' and space only)"
        )));
    }
    Ok(())
}

/// Glance image name rule: at most 255 characters, no control characters.
pub fn validate_glance_name(name: &str) -> Result<()> {
    if name.chars().count() > 255 {
        return Err(CoreError::NameTooLong(255));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(CoreError::NameInvalid(
            "control characters are not allowed".into(),
        ));
    }
    Ok(())
}

/// Description rule: at most 1024 characters, no carriage return, `<` or `>`.
pub fn validate_description(d: &str) -> Result<()> {
    if d.chars().count() > 1024 {
        return Err(CoreError::DescriptionTooLong);
    }
    if d.contains(['\r', '<', '>']) {
        return Err(CoreError::DescriptionInvalid);
    }
    Ok(())
}

/// Tag rules for creation: key 1-36 and value 0-43 characters of letters, digits, `_`, `-`
/// (Huawei also allows Chinese characters, i.e. any alphabetic character).
pub fn validate_tag(key: &str, value: &str) -> Result<()> {
    let ok = |s: &str| {
        s.chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
    };
    if key.is_empty() || key.chars().count() > 36 || !ok(key) {
        return Err(CoreError::TagInvalid(format!(
            "tag key {key:?} must be 1-36 letters, digits, '_' or '-'"
        )));
    }
    if value.chars().count() > 43 || !ok(value) {
        return Err(CoreError::TagInvalid(format!(
            "tag value {value:?} must be at most 43 letters, digits, '_' or '-'"
        )));
    }
    Ok(())
}

/// Glance tag rule: 1-255 characters, not containing `=` or `.` (those separate IMS tags).
pub fn validate_glance_tag(tag: &str) -> Result<()> {
    if tag.is_empty() || tag.chars().count() > 255 {
        return Err(CoreError::TagInvalid(
            "a tag must be 1-255 characters".into(),
        ));
    }
    if tag.contains(['=', '.']) || tag.chars().any(|c| c.is_control() || c == '/') {
        return Err(CoreError::TagInvalid(format!(
            "tag {tag:?} must not contain '=', '.', '/' or control characters"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// OS versions (list_os_versions; `__os_version` and what derives from it)
// ---------------------------------------------------------------------------------------------

/// One supported OS version.
#[derive(Debug, Clone, Copy)]
pub struct OsVersion {
    pub platform: &'static str,
    pub os_version: &'static str,
    pub os_bit: u32,
    pub os_type: &'static str,
    /// Which `tag` filters of list_os_versions include it.
    pub tags: &'static [&'static str],
}

pub const DEFAULT_OS_VERSION: &str = "Other Linux(64 bit)";

pub const OS_VERSIONS: &[OsVersion] = &[
    OsVersion {
        platform: "CentOS",
        os_version: "CentOS 7.9 64bit",
        os_bit: 64,
        os_type: "Linux",
        tags: &["x86", "bms", "uefi"],
    },
    OsVersion {
        platform: "CentOS",
        os_version: "CentOS 8.2 64bit",
        os_bit: 64,
        os_type: "Linux",
        tags: &["x86", "uefi"],
    },
    OsVersion {
        platform: "Ubuntu",
        os_version: "Ubuntu 20.04 server 64bit",
        os_bit: 64,
        os_type: "Linux",
        tags: &["x86", "bms", "uefi"],
    },
    OsVersion {
        platform: "Ubuntu",
        os_version: "Ubuntu 22.04 server 64bit",
        os_bit: 64,
        os_type: "Linux",
        tags: &["x86", "bms", "uefi", "arm"],
    },
    OsVersion {
        platform: "Debian",
        os_version: "Debian GNU/Linux 11.1.0 64bit",
        os_bit: 64,
        os_type: "Linux",
        tags: &["x86", "uefi"],
    },
    OsVersion {
        platform: "Debian",
        os_version: "Debian GNU/Linux 12.0.0 64bit",
        os_bit: 64,
        os_type: "Linux",
        tags: &["x86", "uefi", "arm"],
    },
    OsVersion {
        platform: "EulerOS",
        os_version: "EulerOS 2.5 64bit",
        os_bit: 64,
        os_type: "Linux",
        tags: &["x86", "bms"],
    },
    OsVersion {
        platform: "EulerOS",
        os_version: "EulerOS 2.8 64bit",
        os_bit: 64,
        os_type: "Linux",
        tags: &["arm", "uefi"],
    },
    OsVersion {
        platform: "RedHat",
        os_version: "Redhat Linux Enterprise 8.4 64bit",
        os_bit: 64,
        os_type: "Linux",
        tags: &["x86", "uefi"],
    },
    OsVersion {
        platform: "SUSE",
        os_version: "SUSE Linux Enterprise Server 15 SP4 64bit",
        os_bit: 64,
        os_type: "Linux",
        tags: &["x86"],
    },
    OsVersion {
        platform: "OpenSUSE",
        os_version: "OpenSUSE 15.3 64bit",
        os_bit: 64,
        os_type: "Linux",
        tags: &["x86"],
    },
    OsVersion {
        platform: "Oracle Linux",
        os_version: "Oracle Linux Server release 8.4 64bit",
        os_bit: 64,
        os_type: "Linux",
        tags: &["x86"],
    },
    OsVersion {
        platform: "Fedora",
        os_version: "Fedora 36 64bit",
        os_bit: 64,
        os_type: "Linux",
        tags: &["x86", "uefi"],
    },
    OsVersion {
        platform: "CoreOS",
        os_version: "CoreOS 2023 64bit",
        os_bit: 64,
        os_type: "Linux",
        tags: &["x86"],
    },
    OsVersion {
        platform: "Windows",
        os_version: "Windows Server 2012 R2 Standard 64bit",
        os_bit: 64,
        os_type: "Windows",
        tags: &["x86"],
    },
    OsVersion {
        platform: "Windows",
        os_version: "Windows Server 2019 Standard 64bit",
        os_bit: 64,
        os_type: "Windows",
        tags: &["x86", "uefi"],
    },
    OsVersion {
        platform: "Windows",
        os_version: "Windows Server 2022 Datacenter 64bit",
        os_bit: 64,
        os_type: "Windows",
        tags: &["x86", "uefi"],
    },
    OsVersion {
        platform: "Other",
        os_version: "Other Linux(64 bit)",
        os_bit: 64,
        os_type: "Linux",
        tags: &["x86", "arm", "uefi", "bms"],
    },
    OsVersion {
        platform: "Other",
        os_version: "Other Linux(32 bit)",
        os_bit: 32,
        os_type: "Linux",
        tags: &["x86"],
    },
    OsVersion {
        platform: "Other",
        os_version: "Other Windows(64 bit)",
        os_bit: 64,
        os_type: "Windows",
        tags: &["x86"],
    },
    OsVersion {
        platform: "Other",
        os_version: "Other(64 bit)",
        os_bit: 64,
        os_type: "Other",
        tags: &["x86", "arm"],
    },
];

pub fn find_os_version(v: &str) -> Option<&'static OsVersion> {
    OS_VERSIONS
        .iter()
        .find(|o| o.os_version.eq_ignore_ascii_case(v))
}

// ---------------------------------------------------------------------------------------------
// Listing
// ---------------------------------------------------------------------------------------------

/// Comparison operator of a time filter (`gt:2018-10-28T10:00:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeOp {
    Gt,
    Gte,
    Lt,
    Lte,
    Eq,
    Neq,
}

/// A list request, already parsed from either API's query string.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// attribute -> wanted value; compared with the attribute in the flat view.
    pub equals: Vec<(String, String)>,
    /// `tag=` filters: a legacy `a=b` tag or a Glance tag.
    pub tags: Vec<String>,
    pub created_at: Vec<(TimeOp, i64)>,
    pub updated_at: Vec<(TimeOp, i64)>,
    /// (sort key, ascending)
    pub sort: Vec<(String, bool)>,
    pub limit: usize,
    pub marker: Option<String>,
}

/// Sort keys both APIs accept.
pub const SORT_KEYS: &[&str] = &[
    "name",
    "container_format",
    "disk_format",
    "status",
    "id",
    "size",
    "created_at",
    "updated_at",
    "min_disk",
    "min_ram",
    "visibility",
    "owner",
    "virtual_size",
];

/// Parses `gt:TIME` (or a bare time, meaning eq).
pub fn parse_time_filter(s: &str) -> Option<(TimeOp, i64)> {
    let (op, rest) = match s.split_once(':') {
        Some((op, rest)) if ["gt", "gte", "lt", "lte", "eq", "neq"].contains(&op) => (op, rest),
        _ => ("eq", s),
    };
    let t = parse_time(rest)?;
    let op = match op {
        "gt" => TimeOp::Gt,
        "gte" => TimeOp::Gte,
        "lt" => TimeOp::Lt,
        "lte" => TimeOp::Lte,
        "neq" => TimeOp::Neq,
        _ => TimeOp::Eq,
    };
    Some((op, t))
}

fn time_matches(t: i64, filters: &[(TimeOp, i64)]) -> bool {
    // Times on the wire have second precision: compare at that precision.
    let t = t / 1000;
    filters.iter().all(|&(op, want)| {
        let want = want / 1000;
        match op {
            TimeOp::Gt => t > want,
            TimeOp::Gte => t >= want,
            TimeOp::Lt => t < want,
            TimeOp::Lte => t <= want,
            TimeOp::Eq => t == want,
            TimeOp::Neq => t != want,
        }
    })
}

fn cmp_values(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    let null = |v: Option<&Value>| matches!(v, None | Some(Value::Null));
    match (a, b) {
        _ if null(a) && null(b) => Ordering::Equal,
        _ if null(a) => Ordering::Less,
        _ if null(b) => Ordering::Greater,
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .unwrap_or(0.0)
            .partial_cmp(&y.as_f64().unwrap_or(0.0))
            .unwrap_or(Ordering::Equal),
        (Some(x), Some(y)) => value_string(x).cmp(&value_string(y)),
        _ => Ordering::Equal,
    }
}

/// A value bound to a dynamically built query.
#[derive(Clone)]
enum BindVal {
    S(String),
    I(i64),
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    vals: &'q [BindVal],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for v in vals {
        q = match v {
            BindVal::S(s) => q.bind(s.as_str()),
            BindVal::I(i) => q.bind(*i),
        };
    }
    q
}

/// One page of images, plus whether more follow.
pub struct Page {
    pub images: Vec<Image>,
    pub more: bool,
}

/// Filters, sorts and pages `images` (all images the caller may see).
///
/// The flat attribute view is only built when a filter or sort key needs it.
pub fn apply_list_query(images: Vec<Image>, q: &ListQuery) -> Result<Page> {
    let mut sort = q.sort.clone();
    if sort.is_empty() {
        sort.push(("created_at".into(), false));
    }
    let needs_view = !q.equals.is_empty()
        || sort
            .iter()
            .any(|(k, _)| k != "created_at" && k != "updated_at");
    let mut rows: Vec<(Image, Option<Map<String, Value>>)> = images
        .into_iter()
        .map(|i| {
            let v = needs_view.then(|| i.view());
            (i, v)
        })
        .filter(|(img, view)| {
            let equals_ok =
                q.equals
                    .iter()
                    .all(|(k, want)| match view.as_ref().and_then(|v| v.get(k)) {
                        Some(v) => {
                            let have = value_string(v);
                            have == *want
                                || (want.contains(',') && want.split(',').any(|w| w == have))
                        }
                        None => false,
                    });
            equals_ok
                && q.tags.iter().all(|t| {
                    let (k, v) = t.split_once('=').unwrap_or((t.as_str(), ""));
                    img.tags.iter().any(|(tk, tv)| tk == k && tv == v)
                })
                && time_matches(img.created_at, &q.created_at)
                && time_matches(img.updated_at, &q.updated_at)
        })
        .collect();
    rows.sort_by(|(a, av), (b, bv)| {
        for (key, asc) in &sort {
            let o = match key.as_str() {
                "created_at" => a.created_at.cmp(&b.created_at),
                "updated_at" => a.updated_at.cmp(&b.updated_at),
                _ => cmp_values(
                    av.as_ref().and_then(|v| v.get(key)),
                    bv.as_ref().and_then(|v| v.get(key)),
                ),
            };
            let o = if *asc { o } else { o.reverse() };
            if o != Ordering::Equal {
                return o;
            }
        }
        // Stable tie-break: id in the direction of the first key.
        let o = a.id.cmp(&b.id);
        if sort[0].1 {
            o
        } else {
            o.reverse()
        }
    });
    let start = match &q.marker {
        Some(m) => {
            let pos = rows
                .iter()
                .position(|(i, _)| i.id.to_string() == *m)
                .ok_or_else(|| CoreError::InvalidRequest(format!("No image found with ID {m}")))?;
            pos + 1
        }
        None => 0,
    };
    let total = rows.len();
    let end = start.saturating_add(q.limit).min(total);
    let images = rows
        .into_iter()
        .skip(start)
        .take(end.saturating_sub(start))
        .map(|(i, _)| i)
        .collect();
    Ok(Page {
        images,
        more: end < total,
    })
}

// ---------------------------------------------------------------------------------------------
// Repository
// ---------------------------------------------------------------------------------------------

pub(crate) const IMAGE_COLUMNS: &str =
    "id, owner, name, status, visibility, protected, disk_format, \
    container_format, min_disk, min_ram, size, virtual_size, checksum, os_hash_algo, \
    os_hash_value, disk_manifest, file_manifest, origin, properties, created_at, updated_at, \
    active_at";

pub(crate) fn image_from_row(r: &sqlx::any::AnyRow) -> Result<Image> {
    let id = r.s("id");
    let properties: Map<String, Value> = serde_json::from_str(&r.s("properties"))
        .map_err(|e| CoreError::Internal(format!("image {id}: bad properties: {e}")))?;
    Ok(Image {
        id: ImageId::parse(&id)
            .ok_or_else(|| CoreError::Internal(format!("bad image id in database: {id}")))?,
        owner: ProjectId(r.s("owner")),
        name: r.os("name"),
        status: ImageStatus::parse(&r.s("status")).unwrap_or(ImageStatus::Killed),
        visibility: r.s("visibility"),
        protected: r.i("protected") != 0,
        disk_format: r.os("disk_format"),
        container_format: r.os("container_format"),
        min_disk: r.i("min_disk"),
        min_ram: r.i("min_ram"),
        size: r.oi("size"),
        virtual_size: r.oi("virtual_size"),
        checksum: r.os("checksum"),
        os_hash_algo: r.os("os_hash_algo"),
        os_hash_value: r.os("os_hash_value"),
        disk_manifest: r.os("disk_manifest"),
        file_manifest: r.os("file_manifest"),
        origin: Origin::parse(&r.s("origin")),
        properties,
        tags: Vec::new(),
        created_at: r.i("created_at"),
        updated_at: r.i("updated_at"),
        active_at: r.oi("active_at"),
        access: Access::Owner,
        shared_out: false,
    })
}

impl Db {
    /// Inserts a new image, refusing it when the owner's private-image quota is used up.
    pub async fn insert_image(&self, img: &Image, quota: u64) -> Result<()> {
        let mut tx = crate::db::begin_write(&self.pool).await?;
        insert_image_in(&mut tx, img, quota).await?;
        tx.commit().await?;
        Ok(())
    }

    /// One image by id, with its tags, whoever owns it (callers scope).
    pub async fn get_image(&self, id: &ImageId) -> Result<Option<Image>> {
        let row = sqlx::query(&format!("SELECT {IMAGE_COLUMNS} FROM images WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let mut img = image_from_row(&row)?;
        img.tags = self.image_tags(&img.id).await?;
        Ok(Some(img))
    }

    /// All images owned by `owner`, with their tags.
    pub async fn images_of(&self, owner: &ProjectId) -> Result<Vec<Image>> {
        let rows = sqlx::query(&format!(
            "SELECT {IMAGE_COLUMNS} FROM images WHERE owner = $1"
        ))
        .bind(owner.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut images = rows
            .iter()
            .map(image_from_row)
            .collect::<Result<Vec<_>>>()?;
        let tag_rows = sqlx::query(
            "SELECT t.image_id, t.tag_key, t.tag_value FROM image_tags t JOIN images i ON i.id = t.image_id \
             WHERE i.owner = $1 ORDER BY t.created_at, t.tag_key",
        )
        .bind(owner.as_str())
        .fetch_all(&self.pool)
        .await?;
        let mut by_id: std::collections::HashMap<String, Vec<(String, String)>> =
            Default::default();
        for r in &tag_rows {
            by_id
                .entry(r.s("image_id"))
                .or_default()
                .push((r.s("tag_key"), r.s("tag_value")));
        }
        for img in &mut images {
            if let Some(t) = by_id.remove(&img.id.to_string()) {
                img.tags = t;
            }
        }
        Ok(images)
    }

    /// One page of the images `owner` owns, filtered, sorted and paged by the database, when
    /// the query only uses what the database can answer from columns and indexes: equality on
    /// plain columns, `created_at`/`updated_at` ranges, one sort key among `created_at` and
    /// `updated_at`, and an id marker. `None` means the caller must fall back to
    /// [`apply_list_query`] over all the owner's images (custom properties, tags, other sorts).
    ///
    /// The page is a keyset query (`(key, id)` strictly after the marker's), so its cost does not
    /// grow with the number of images the project has.
    pub async fn page_of(&self, owner: &ProjectId, q: &ListQuery) -> Result<Option<Page>> {
        const COLUMNS: &[&str] = &[
            "name",
            "status",
            "visibility",
            "disk_format",
            "container_format",
        ];
        if !q.tags.is_empty() || q.sort.len() > 1 {
            return Ok(None);
        }
        let (key, asc) = match q.sort.first() {
            None => ("created_at", false),
            Some((k, asc)) if k == "created_at" => ("created_at", *asc),
            Some((k, asc)) if k == "updated_at" => ("updated_at", *asc),
            Some(_) => return Ok(None),
        };
        if !q.equals.iter().all(|(k, _)| COLUMNS.contains(&k.as_str())) {
            return Ok(None);
        }
        // WHERE clause shared by the marker lookup and the page query.
        let mut cond = String::from("owner = $1");
        let mut binds: Vec<BindVal> = vec![BindVal::S(owner.as_str().to_string())];
        for (k, want) in &q.equals {
            // Same semantics as the in-memory filter: the value, or one of a comma list.
            let mut alts: Vec<&str> = vec![want.as_str()];
            if want.contains(',') {
                alts.extend(want.split(','));
            }
            let mut ors = Vec::new();
            for a in alts {
                binds.push(BindVal::S(a.to_string()));
                ors.push(format!("COALESCE({k}, '') = ${}", binds.len()));
            }
            cond.push_str(&format!(" AND ({})", ors.join(" OR ")));
        }
        for (col, filters) in [("created_at", &q.created_at), ("updated_at", &q.updated_at)] {
            for &(op, want) in filters.iter() {
                let op = match op {
                    TimeOp::Gt => ">",
                    TimeOp::Gte => ">=",
                    TimeOp::Lt => "<",
                    TimeOp::Lte => "<=",
                    TimeOp::Eq => "=",
                    TimeOp::Neq => "<>",
                };
                // Second precision, as on the wire.
                binds.push(BindVal::I(want / 1000));
                cond.push_str(&format!(" AND ({col} / 1000) {op} ${}", binds.len()));
            }
        }
        let mut page_cond = cond.clone();
        let mut page_binds = binds.clone();
        if let Some(m) = &q.marker {
            let mut sql = format!("SELECT {key} AS k, id FROM images WHERE {cond}");
            binds.push(BindVal::S(m.clone()));
            sql.push_str(&format!(" AND id = ${}", binds.len()));
            let row = bind_all(sqlx::query(&sql), &binds)
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| CoreError::InvalidRequest(format!("No image found with ID {m}")))?;
            let cmp = if asc { ">" } else { "<" };
            page_binds.push(BindVal::I(row.i("k")));
            let kn = page_binds.len();
            page_binds.push(BindVal::S(row.s("id")));
            let idn = page_binds.len();
            page_cond.push_str(&format!(
                " AND ({key} {cmp} ${kn} OR ({key} = ${kn} AND id {cmp} ${idn}))"
            ));
        }
        let dir = if asc { "ASC" } else { "DESC" };
        let limit = q.limit.min(i64::MAX as usize - 1) as i64;
        page_binds.push(BindVal::I(limit + 1));
        let sql = format!(
            "SELECT {IMAGE_COLUMNS} FROM images WHERE {page_cond} \
             ORDER BY {key} {dir}, id {dir} LIMIT ${}",
            page_binds.len()
        );
        let rows = bind_all(sqlx::query(&sql), &page_binds)
            .fetch_all(&self.pool)
            .await?;
        let more = rows.len() as i64 > limit;
        let mut images = rows
            .iter()
            .take(limit as usize)
            .map(image_from_row)
            .collect::<Result<Vec<_>>>()?;
        self.load_tags(&mut images).await?;
        Ok(Some(Page { images, more }))
    }

    /// Fills in the tags of `images` with one query.
    async fn load_tags(&self, images: &mut [Image]) -> Result<()> {
        if images.is_empty() {
            return Ok(());
        }
        let marks: Vec<String> = (1..=images.len()).map(|n| format!("${n}")).collect();
        let sql = format!(
            "SELECT image_id, tag_key, tag_value FROM image_tags WHERE image_id IN ({}) \
             ORDER BY created_at, tag_key",
            marks.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for img in images.iter() {
            query = query.bind(img.id.to_string());
        }
        let rows = query.fetch_all(&self.pool).await?;
        for img in images.iter_mut() {
            let id = img.id.to_string();
            img.tags = rows
                .iter()
                .filter(|r| r.s("image_id") == id)
                .map(|r| (r.s("tag_key"), r.s("tag_value")))
                .collect();
        }
        Ok(())
    }

    pub async fn count_images(&self, owner: &ProjectId) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM images WHERE owner = $1")
            .bind(owner.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }

    /// Writes the mutable attributes of `img` (not status, data or tags).
    pub async fn save_image_attrs(&self, img: &Image) -> Result<()> {
        sqlx::query(
            "UPDATE images SET name = $1, visibility = $2, protected = $3, disk_format = $4, \
             container_format = $5, min_disk = $6, min_ram = $7, properties = $8, updated_at = $9 \
             WHERE id = $10",
        )
        .bind(&img.name)
        .bind(&img.visibility)
        .bind(img.protected as i64)
        .bind(&img.disk_format)
        .bind(&img.container_format)
        .bind(img.min_disk)
        .bind(img.min_ram)
        .bind(Value::Object(img.properties.clone()).to_string())
        .bind(now_ms())
        .bind(img.id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Moves an image from `from` to `to` if it is still in `from`; sets the upload token.
    pub async fn transition(
        &self,
        id: &ImageId,
        from: ImageStatus,
        to: ImageStatus,
        upload_token: Option<&str>,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE images SET status = $1, upload_token = $2, updated_at = $3 WHERE id = $4 AND status = $5",
        )
        .bind(to.as_str())
        .bind(upload_token)
        .bind(now_ms())
        .bind(id.to_string())
        .bind(from.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Marks an upload's image `active` with its data, if the same upload still owns it.
    pub async fn activate_upload(&self, img: &Image, upload_token: &str) -> Result<bool> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE images SET status = 'active', size = $1, virtual_size = $2, checksum = $3, \
             os_hash_algo = $4, os_hash_value = $5, disk_manifest = $6, file_manifest = $7, \
             properties = $8, updated_at = $9, active_at = $9, upload_token = NULL \
             WHERE id = $10 AND status = 'saving' AND upload_token = $11",
        )
        .bind(img.size)
        .bind(img.virtual_size)
        .bind(&img.checksum)
        .bind(&img.os_hash_algo)
        .bind(&img.os_hash_value)
        .bind(&img.disk_manifest)
        .bind(&img.file_manifest)
        .bind(Value::Object(img.properties.clone()).to_string())
        .bind(now)
        .bind(img.id.to_string())
        .bind(upload_token)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Uploads of this node that a crash interrupted go back to `queued` (re-uploadable).
    ///
    /// Only images whose upload token starts with exactly `node_prefix` (compared as a
    /// string, not a `LIKE` pattern, so a `_` or `%` in a node id matches only itself) and
    /// that no open (queued or running) job owns through its token (`import:<job id>`, see
    /// `import.rs`): an import job holds its image `saving` across a takeover by another
    /// node, and that image is not an interrupted upload.
    pub async fn reset_interrupted_uploads(&self, node_prefix: &str) -> Result<u64> {
        let r = sqlx::query(
            "UPDATE images SET status = 'queued', upload_token = NULL, updated_at = $1 \
             WHERE status = 'saving' AND substr(upload_token, 1, CAST($2 AS INTEGER)) = $3 \
             AND NOT EXISTS (SELECT 1 FROM jobs WHERE 'import:' || jobs.id = images.upload_token \
                             AND jobs.status IN ('INIT', 'RUNNING'))",
        )
        .bind(now_ms())
        .bind(node_prefix.chars().count() as i64)
        .bind(node_prefix)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    pub async fn delete_image_row(&self, id: &ImageId) -> Result<bool> {
        let mut tx = crate::db::begin_write(&self.pool).await?;
        // Members go with the image: recipients lose access in the same transaction.
        for sql in [
            "DELETE FROM image_tags WHERE image_id = $1",
            "DELETE FROM image_member_answers WHERE image_id = $1",
            "DELETE FROM image_members WHERE image_id = $1",
        ] {
            sqlx::query(sql)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        let r = sqlx::query("DELETE FROM images WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }

    /// What a GC pass needs: the live set ([`Db::live_manifests`]) and the grace to pass
    /// to the store's GC, measured from the pass's cutoff ([`Db::gc_cutoff`]). The cutoff is
    /// read first, so work that ends in between is covered by one or the other.
    pub async fn gc_inputs(
        &self,
        grace: std::time::Duration,
    ) -> Result<(Vec<String>, std::time::Duration)> {
        let cutoff = self.gc_cutoff(grace).await?;
        let live = self.live_manifests().await?;
        let grace = std::time::SystemTime::now()
            .duration_since(cutoff)
            .unwrap_or_default();
        Ok((live, grace))
    }

    /// The GC's cutoff: unreferenced data written after it is kept. It is `grace` before
    /// now at the latest, and earlier when a job or an upload is still open: what they write
    /// is referenced only once they end, so nothing written since the oldest of them started
    /// may go (less a minute for clock differences between nodes and the store).
    async fn gc_cutoff(&self, grace: std::time::Duration) -> Result<std::time::SystemTime> {
        let now = std::time::SystemTime::now();
        let mut cutoff = now.checked_sub(grace).unwrap_or(std::time::UNIX_EPOCH);
        let oldest_job: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(created_at) FROM jobs WHERE status IN ('INIT', 'RUNNING')",
        )
        .fetch_one(&self.pool)
        .await?;
        let oldest_upload: Option<i64> =
            sqlx::query_scalar("SELECT MIN(created_at) FROM images WHERE status = 'saving'")
                .fetch_one(&self.pool)
                .await?;
        if let Some(ms) = [oldest_job, oldest_upload].into_iter().flatten().min() {
            let open = std::time::UNIX_EPOCH
                + std::time::Duration::from_millis(ms.max(0) as u64)
                    .saturating_sub(std::time::Duration::from_secs(60));
            cutoff = cutoff.min(open);
        }
        Ok(cutoff)
    }

    /// Every manifest something references (the GC's live set): images (disk and file
    /// manifests), bucket objects (their parts), unfinished multipart uploads (their
    /// uploaded parts), the sources of jobs not yet ended (`job_sources`) and the manifests
    /// their checkpoints pin (`pinned_manifests`).
    pub async fn live_manifests(&self) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT disk_manifest AS m FROM images WHERE disk_manifest IS NOT NULL \
             UNION SELECT file_manifest AS m FROM images WHERE file_manifest IS NOT NULL \
             UNION SELECT manifest AS m FROM object_parts \
             UNION SELECT manifest AS m FROM upload_parts \
             UNION SELECT s.disk_manifest AS m FROM job_sources s JOIN jobs j ON j.id = s.job_id \
               WHERE s.disk_manifest IS NOT NULL AND j.status IN ('INIT', 'RUNNING') \
             UNION SELECT s.file_manifest AS m FROM job_sources s JOIN jobs j ON j.id = s.job_id \
               WHERE s.file_manifest IS NOT NULL AND j.status IN ('INIT', 'RUNNING')",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut live: Vec<String> = rows.iter().map(|r| r.s("m")).collect();
        // Manifests an open job's checkpoint holds (e.g. an import's partial manifest).
        let checkpoints = sqlx::query(
            "SELECT checkpoint FROM jobs WHERE status IN ('INIT', 'RUNNING') AND checkpoint IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        for r in &checkpoints {
            let Ok(cp) = serde_json::from_str::<Value>(&r.s("checkpoint")) else {
                continue;
            };
            if let Some(pins) = cp.get("pinned_manifests").and_then(Value::as_array) {
                live.extend(pins.iter().filter_map(Value::as_str).map(str::to_string));
            }
        }
        Ok(live)
    }
}

/// [`Db::insert_image`] inside the caller's transaction: the image and its tags, or
/// `ImageQuotaExceeded` when the owner's images, the new one included, exceed `quota` (the
/// caller then drops `tx`, which rolls the insert back).
pub(crate) async fn insert_image_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    img: &Image,
    quota: u64,
) -> Result<()> {
    // Write first, then check: on SQLite a transaction that reads before it writes cannot
    // wait for a concurrent writer (its lock upgrade fails at once), so the insert takes the
    // write lock and the quota check counts the new row too.
    insert_image_row(tx, img).await?;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM images WHERE owner = $1")
        .bind(img.owner.as_str())
        .fetch_one(&mut **tx)
        .await?;
    if n as u64 > quota {
        return Err(CoreError::ImageQuotaExceeded(quota));
    }
    for (k, v) in &img.tags {
        sqlx::query(
            "INSERT INTO image_tags (image_id, tag_key, tag_value, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(img.id.to_string())
        .bind(k)
        .bind(v)
        .bind(now_ms())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Whether image `id` exists and is active, locking its row until `tx` ends (a no-op write:
/// PostgreSQL holds the row lock, SQLite the database write lock), so that it cannot be
/// deleted or change status before `tx` commits.
pub(crate) async fn lock_active_image(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: &ImageId,
) -> Result<bool> {
    let r = sqlx::query(
        "UPDATE images SET updated_at = updated_at WHERE id = $1 AND status = 'active'",
    )
    .bind(id.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected() == 1)
}

pub(crate) async fn insert_image_row(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    img: &Image,
) -> Result<()> {
    sqlx::query(&format!(
        "INSERT INTO images ({IMAGE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
         $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)"
    ))
    .bind(img.id.to_string())
    .bind(img.owner.as_str())
    .bind(&img.name)
    .bind(img.status.as_str())
    .bind(&img.visibility)
    .bind(img.protected as i64)
    .bind(&img.disk_format)
    .bind(&img.container_format)
    .bind(img.min_disk)
    .bind(img.min_ram)
    .bind(img.size)
    .bind(img.virtual_size)
    .bind(&img.checksum)
    .bind(&img.os_hash_algo)
    .bind(&img.os_hash_value)
    .bind(&img.disk_manifest)
    .bind(&img.file_manifest)
    .bind(img.origin.as_str())
    .bind(Value::Object(img.properties.clone()).to_string())
    .bind(img.created_at)
    .bind(img.updated_at)
    .bind(img.active_at)
    .execute(&mut **tx)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            CoreError::DuplicateImage(img.id.to_string())
        }
        _ => CoreError::Db(e),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ims_names() {
        assert!(validate_ims_name("Windows Server 2012").is_ok());
        assert!(validate_ims_name("镜像-1").is_ok());
        assert!(matches!(validate_ims_name(""), Err(CoreError::NameMissing)));
        assert!(matches!(
            validate_ims_name(" a"),
            Err(CoreError::NameInvalid(_))
        ));
        assert!(matches!(
            validate_ims_name("a/b"),
            Err(CoreError::NameInvalid(_))
        ));
        assert!(matches!(
            validate_ims_name(&"a".repeat(129)),
            Err(CoreError::NameTooLong(128))
        ));
    }

    #[test]
    fn tags_and_descriptions() {
        assert!(validate_tag("env", "prod").is_ok());
        assert!(validate_tag("env", "").is_ok());
        assert!(validate_tag("", "x").is_err());
        assert!(validate_tag(&"k".repeat(37), "x").is_err());
        assert!(validate_tag("k", &"v".repeat(44)).is_err());
        assert!(validate_description("ok").is_ok());
        assert!(validate_description("<b>").is_err());
        assert!(validate_glance_tag("a.b").is_err());
    }

    #[test]
    fn os_version_derives_attributes() {
        let mut img = Image::new(ProjectId::generate(), Some("x".into()), Origin::Metadata);
        img.set_os_version("Windows Server 2019 Standard 64bit")
            .unwrap();
        assert_eq!(img.prop("__os_type"), Some("Windows"));
        assert_eq!(img.prop("__platform"), Some("Windows"));
        assert!(img.set_os_version("Plan 9").is_err());
    }

    #[test]
    fn list_sorts_pages_and_filters() {
        let owner = ProjectId::generate();
        let mut imgs = Vec::new();
        for (i, name) in ["b", "a", "c"].iter().enumerate() {
            let mut img = Image::new(owner.clone(), Some(name.to_string()), Origin::Metadata);
            img.created_at = 1_000_000 + i as i64 * 1000;
            imgs.push(img);
        }
        let q = ListQuery {
            sort: vec![("name".into(), true)],
            limit: 2,
            ..Default::default()
        };
        let page = apply_list_query(imgs.clone(), &q).unwrap();
        let names: Vec<_> = page
            .images
            .iter()
            .map(|i| i.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(page.more);
        let q2 = ListQuery {
            marker: Some(page.images[1].id.to_string()),
            ..q.clone()
        };
        let page2 = apply_list_query(imgs.clone(), &q2).unwrap();
        assert_eq!(page2.images.len(), 1);
        assert!(!page2.more);
        let q3 = ListQuery {
            equals: vec![("name".into(), "c".into())],
            limit: 10,
            ..Default::default()
        };
        assert_eq!(apply_list_query(imgs.clone(), &q3).unwrap().images.len(), 1);
        let q4 = ListQuery {
            marker: Some("nope".into()),
            limit: 10,
            ..Default::default()
        };
        assert!(apply_list_query(imgs, &q4).is_err());
    }
}
