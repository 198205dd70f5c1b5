//! LUKS container detection (always refused: the content can not be inspected).

use super::bytes::{be16, be32, be64, printable, slice};
use super::{Details, Input, Report, Violation};
use serde::Serialize;

/// `LUKS\xba\xbe`.
pub const MAGIC: &[u8] = b"LUKS\xba\xbe";

/// LUKS header summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LuksHeader {
    /// 1 or 2.
    pub version: u16,
    /// LUKS1 cipher name.
    pub cipher_name: String,
    /// LUKS1 payload offset in bytes; LUKS2 header size.
    pub payload_offset: u64,
}

pub(crate) fn analyze(inp: &Input, rep: &mut Report) {
    let b = inp.head;
    let version = be16(b, 6);
    let payload_offset = if version == 1 {
        u64::from(be32(b, 104)) * 512
    } else {
        be64(b, 8)
    };
    let cipher_name = printable(slice(b, 8, 32), 32)
        .trim_end_matches('?')
        .to_string();
    rep.virtual_size = inp.file_size.saturating_sub(payload_offset);
    rep.v(Violation::LuksEncrypted);
    rep.details = Details::Luks(LuksHeader {
        version,
        cipher_name: if version == 1 {
            cipher_name
        } else {
            String::new()
        },
        payload_offset,
    });
}
