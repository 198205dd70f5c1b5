//! `SDK-HMAC-SHA256` request signatures, computed exactly as the Huawei Cloud SDK computes
//! them (spec section D), so the server can verify what the client signed.

use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};

/// Characters Python's `quote(s, safe='~')` leaves alone: A-Z a-z 0-9 `-_.~`.
const QUOTE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

pub const ALGORITHM: &str = "SDK-HMAC-SHA256";
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn quote(s: &str) -> String {
    utf8_percent_encode(s, QUOTE).to_string()
}

fn unquote(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// CanonicalURI: each decoded path segment re-encoded, always ending in `/`.
pub fn canonical_uri(path: &str) -> String {
    let decoded = unquote(path);
    let mut out: String = decoded.split('/').map(quote).collect::<Vec<_>>().join("/");
    if !out.ends_with('/') {
        out.push('/');
    }
    out
}

/// CanonicalQueryString: pairs decoded, re-encoded, sorted by key then value.
pub fn canonical_query(raw_query: &str) -> String {
    let mut pairs: Vec<(String, String)> = raw_query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (quote(&unquote(k)), quote(&unquote(v)))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The canonical request: method, URI, query, headers, signed header list, payload hash.
pub fn canonical_request(
    method: &str,
    path: &str,
    raw_query: &str,
    headers: &[(String, String)],
    signed_headers: &[String],
    payload_hash: &str,
) -> String {
    let mut canon_headers = String::new();
    for name in signed_headers {
        let value = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .unwrap_or("");
        canon_headers.push_str(name);
        canon_headers.push(':');
        canon_headers.push_str(value);
        canon_headers.push('\n');
    }
    format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        method.to_ascii_uppercase(),
        canonical_uri(path),
        canonical_query(raw_query),
        canon_headers,
        signed_headers.join(";"),
        payload_hash
    )
}

pub fn string_to_sign(sdk_date: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{sdk_date}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    )
}

pub fn signature(secret_key: &str, string_to_sign: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret_key.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(string_to_sign.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// The parts of an `Authorization: SDK-HMAC-SHA256 Access=.., SignedHeaders=.., Signature=..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthHeader {
    pub access: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

pub fn parse_auth_header(v: &str) -> Option<AuthHeader> {
    let rest = v.trim().strip_prefix(ALGORITHM)?.trim();
    let mut access = None;
    let mut signed = None;
    let mut sig = None;
    for part in rest.split(',') {
        let (k, val) = part.trim().split_once('=')?;
        match k.trim() {
            "Access" => access = Some(val.trim().to_string()),
            "SignedHeaders" => {
                signed = Some(
                    val.trim()
                        .split(';')
                        .map(|s| s.trim().to_ascii_lowercase())
                        .collect(),
                )
            }
            "Signature" => sig = Some(val.trim().to_ascii_lowercase()),
            _ => {}
        }
    }
    Some(AuthHeader {
        access: access?,
        signed_headers: signed?,
        signature: sig?,
    })
}

/// Parses `X-Sdk-Date` (`%Y%m%dT%H%M%SZ`) into Unix seconds.
pub fn parse_sdk_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    let month = time::Month::try_from(mo as u8).ok()?;
    let date = time::Date::from_calendar_date(y as i32, month, d as u8).ok()?;
    let t = time::Time::from_hms(h as u8, mi as u8, se as u8).ok()?;
    Some(
        time::PrimitiveDateTime::new(date, t)
            .assume_utc()
            .unix_timestamp(),
    )
}

/// Constant-time comparison of two signatures.
pub fn same_signature(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ct: &str) -> Vec<(String, String)> {
        vec![
            ("content-type".into(), ct.into()),
            ("host".into(), "127.0.0.1:8080".into()),
            ("user-agent".into(), "huaweicloud-usdk-python/3.0".into()),
            (
                "x-project-id".into(),
                "0123456789abcdef0123456789abcdef".into(),
            ),
            ("x-sdk-date".into(), "20250101T000000Z".into()),
        ]
    }

    fn signed() -> Vec<String> {
        "content-type;host;user-agent;x-project-id;x-sdk-date"
            .split(';')
            .map(String::from)
            .collect()
    }

    const SK: &str = "SKEXAMPLEsecret0000000000000000000000001";

    #[test]
    fn worked_example_hmac() {
        let sts = "SDK-HMAC-SHA256\n20191115T033655Z\nb25362e603ee30f4f25e7858e8a7160fd36e803bb2dfe206278659d71a9bcd7a";
        assert_eq!(
            signature("MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc", sts),
            "7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe"
        );
    }

    #[test]
    fn vector_a_post_with_body() {
        let body = br#"{"name": "copy1"}"#;
        let hash = hex::encode(Sha256::digest(body));
        assert_eq!(
            hash,
            "d2f01a75eb893080eee5fe3b97e8aef756ceb62b77e1b6fa41be76208688d35a"
        );
        let cr = canonical_request(
            "POST",
            "/v1/cloudimages/465076de-dc36-4aec-80f5-ef9d8009428f/copy",
            "",
            &headers("application/json;charset=utf-8"),
            &signed(),
            &hash,
        );
        let sig = signature(SK, &string_to_sign("20250101T000000Z", &cr));
        assert_eq!(
            sig,
            "4c223084c4c110c3c4e3904457468fb34db6d21e7de89724ed4acce2728f030f"
        );
    }

    #[test]
    fn vector_b_get_with_query() {
        let q = "__imagetype=private&limit=10&name=my%20img&protected=true";
        let cr = canonical_request(
            "GET",
            "/v2/cloudimages",
            q,
            &headers("application/json"),
            &signed(),
            EMPTY_SHA256,
        );
        assert!(cr.starts_with(
            "GET\n/v2/cloudimages/\n__imagetype=private&limit=10&name=my%20img&protected=true\n"
        ));
        assert!(cr.contains("x-sdk-date:20250101T000000Z\n\ncontent-type;host"));
        let sig = signature(SK, &string_to_sign("20250101T000000Z", &cr));
        assert_eq!(
            sig,
            "9662c1fbefba132648be33d1678c7af1dbc1b3c602526672524e480b884c51cb"
        );
        // Query order on the wire does not matter.
        let cr2 = canonical_request(
            "GET",
            "/v2/cloudimages",
            "protected=true&name=my%20img&limit=10&__imagetype=private",
            &headers("application/json"),
            &signed(),
            EMPTY_SHA256,
        );
        assert_eq!(cr, cr2);
    }

    #[test]
    fn parses_header_and_date() {
        let h = parse_auth_header(
            "SDK-HMAC-SHA256 Access=AK1, SignedHeaders=content-type;host, Signature=ABCD",
        )
        .unwrap();
        assert_eq!(h.access, "AK1");
        assert_eq!(h.signed_headers, ["content-type", "host"]);
        assert_eq!(h.signature, "abcd");
        assert!(parse_auth_header("AWS4-HMAC-SHA256 Credential=x").is_none());
        assert_eq!(parse_sdk_date("20250101T000000Z"), Some(1735689600));
        assert_eq!(parse_sdk_date("2025-01-01"), None);
        assert!(same_signature("ab", "ab") && !same_signature("ab", "ac"));
    }

    #[test]
    fn uri_encoding() {
        assert_eq!(canonical_uri("/v2/images/a b"), "/v2/images/a%20b/");
        assert_eq!(canonical_uri("/"), "/");
    }
}
