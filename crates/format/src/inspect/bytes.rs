//! Bounds-checked byte access and bounded reads used by every parser in `inspect`.
//!
//! Every accessor returns 0 when the field lies (partly) outside the buffer, so parsers never
//! panic on short input; callers check lengths separately where it matters.

use crate::ReadAt;

macro_rules! int_reader {
    ($name:ident, $ty:ty, $n:expr, $conv:ident) => {
        #[doc = concat!("Reads a `", stringify!($ty), "` at `off` (0 if out of range).")]
        pub fn $name(b: &[u8], off: usize) -> $ty {
            match off.checked_add($n).and_then(|end| b.get(off..end)) {
                Some(s) => {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(s);
                    <$ty>::$conv(a)
                }
                None => 0,
            }
        }
    };
}

int_reader!(be16, u16, 2, from_be_bytes);
int_reader!(be32, u32, 4, from_be_bytes);
int_reader!(be64, u64, 8, from_be_bytes);
int_reader!(le16, u16, 2, from_le_bytes);
int_reader!(le32, u32, 4, from_le_bytes);
int_reader!(le64, u64, 8, from_le_bytes);

/// `b[off..off+n]` or an empty slice when out of range.
pub fn slice(b: &[u8], off: usize, n: usize) -> &[u8] {
    off.checked_add(n)
        .and_then(|end| b.get(off..end))
        .unwrap_or(&[])
}

/// Copies `N` bytes at `off` into an array (zeros when out of range).
pub fn array<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    let s = slice(b, off, N);
    if s.len() == N {
        a.copy_from_slice(s);
    }
    a
}

/// Largest single read the inspector ever makes (callers chunk anything bigger).
pub const MAX_READ: usize = 4 << 20;

/// Reads `len` bytes at `off` (capped at [`MAX_READ`]), zero-padded when the file is shorter.
/// Returns the buffer and how many bytes actually came from the file.
pub fn read_padded(src: &dyn ReadAt, off: u64, len: usize) -> std::io::Result<(Vec<u8>, usize)> {
    let len = len.min(MAX_READ);
    let mut buf = vec![0u8; len];
    let mut got = 0usize;
    while got < len {
        let pos = match off.checked_add(got as u64) {
            Some(p) => p,
            None => break,
        };
        let n = src.read_at(&mut buf[got..], pos)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok((buf, got))
}

/// `off + len <= file_size` without overflow.
pub fn fits(off: u64, len: u64, file_size: u64) -> bool {
    off.checked_add(len).is_some_and(|end| end <= file_size)
}

/// Rounds `v` up to a multiple of `align` (a power of two); saturates on overflow.
pub fn round_up(v: u64, align: u64) -> u64 {
    if align == 0 {
        return v;
    }
    v.checked_add(align - 1)
        .map_or(u64::MAX, |x| x & !(align - 1))
}

/// `ceil(a / b)`, 0 when `b == 0`.
pub fn div_ceil(a: u64, b: u64) -> u64 {
    if b == 0 {
        0
    } else {
        a.div_ceil(b)
    }
}

/// A GUID as stored on disk by Microsoft formats (first three fields little-endian), formatted
/// in the usual `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX` form.
pub fn guid_string(g: &[u8; 16]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}

/// Printable ASCII rendering of untrusted bytes, truncated to `max` characters.
pub fn printable(b: &[u8], max: usize) -> String {
    b.iter()
        .take(max)
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                c as char
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_are_total() {
        let b = [1u8, 2, 3];
        assert_eq!(be16(&b, 0), 0x0102);
        assert_eq!(be32(&b, 0), 0);
        assert_eq!(le64(&b, usize::MAX), 0);
        assert_eq!(slice(&b, 2, 5), &[] as &[u8]);
        assert_eq!(round_up(u64::MAX, 512), u64::MAX);
        assert!(!fits(u64::MAX, 1, u64::MAX));
    }
}
