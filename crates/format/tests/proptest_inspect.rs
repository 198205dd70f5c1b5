//! Property tests: `inspect` never panics (nor errors on in-memory input) on arbitrary bytes
//! and on mutated real images made by qemu-img.

mod util;

use std::sync::OnceLock;

use openims_format::inspect::{detect, inspect, InspectOptions};
use proptest::prelude::*;
use util::*;

/// Real images, made once: (name, bytes).
fn seeds() -> &'static Vec<(&'static str, Vec<u8>)> {
    static SEEDS: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let src = p(dir.path(), "src.raw");
        make_source_raw(&src, 8 * MIB);
        let s = src.to_str().unwrap();
        let mut out = Vec::new();
        let list: &[(&str, &str, &str)] = &[
            ("qcow2", "qcow2", "cluster_size=4k"),
            ("qcow2-v2", "qcow2", "compat=0.10,cluster_size=4k"),
            ("qcow2-extl2", "qcow2", "extended_l2=on,cluster_size=16k"),
            ("vmdk", "vmdk", "subformat=monolithicSparse"),
            ("vmdk-stream", "vmdk", "subformat=streamOptimized"),
            ("vpc", "vpc", "subformat=dynamic"),
            ("vhdx", "vhdx", "block_size=1M,log_size=1M"),
            ("qed", "qed", "cluster_size=4k"),
            ("vdi", "vdi", "static=off"),
        ];
        for (name, fmt, opts) in list {
            let d = p(dir.path(), name);
            qemu_img(&[
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                fmt,
                "-o",
                opts,
                s,
                d.to_str().unwrap(),
            ]);
            let mut bytes = std::fs::read(&d).unwrap();
            if *name == "vmdk-stream" {
                out.push(("vmdk-stream-footer", vmdk_stream_with_footer(&bytes)));
            }
            if *name == "qcow2" {
                let c = p(dir.path(), "c.qcow2");
                qemu_img(&[
                    "convert",
                    "-q",
                    "-c",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-o",
                    "cluster_size=4k",
                    s,
                    c.to_str().unwrap(),
                ]);
                out.push(("qcow2-compressed", std::fs::read(&c).unwrap()));
            }
            bytes.shrink_to_fit();
            out.push((name, bytes));
        }
        out
    })
}

fn check(bytes: &[u8]) {
    let v = bytes.to_vec();
    for deep in [true, false] {
        let opts = InspectOptions {
            deep,
            ..Default::default()
        };
        let a = inspect(&v, &opts).expect("in-memory inspect never errors");
        let b = inspect(&v, &opts).expect("in-memory inspect never errors");
        assert_eq!(a.violation_names(), b.violation_names());
        assert_eq!(a.format, b.format);
        for x in &a.violations {
            let _ = x.to_string();
        }
    }
    let _ = detect(bytes);
}

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    9,
    21,
    22,
    63,
    64,
    511,
    512,
    4096,
    65535,
    65536,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        check(&bytes);
    }

    #[test]
    fn magic_prefixed_garbage_never_panics(
        magic in prop::sample::select(vec![&b"QFI\xfb\0\0\0\x03"[..], b"QFI\xfb\0\0\0\x02", b"QFI\xfb\0\0\0\x01", b"KDMV", b"COWD", b"QED\0", b"vhdxfile", b"conectix", b"LUKS\xba\xbe", b"# Disk DescriptorFile\nversion=1\n"]),
        body in proptest::collection::vec(any::<u8>(), 0..2048),
        tail_len in 0usize..400_000,
    ) {
        let mut b = magic.to_vec();
        b.extend_from_slice(&body);
        b.resize(b.len() + tail_len, 0);
        check(&b);
    }

    #[test]
    fn mutated_real_headers_never_panic(
        seed in 0usize..12,
        pokes in proptest::collection::vec((0usize..600_000, any::<u8>()), 1..24),
        words in proptest::collection::vec((0usize..4096, prop::sample::select(INTERESTING.to_vec()), any::<bool>()), 0..6),
        truncate in prop::option::of(0usize..2_000_000),
    ) {
        let seeds = seeds();
        let (_, base) = &seeds[seed % seeds.len()];
        let mut b = base.clone();
        let n = b.len();
        for (off, val) in pokes {
            // Concentrate on metadata: the first 600 KiB and the last 2 KiB.
            let o = if off % 4 == 0 { n.saturating_sub(1 + off % 2048) } else { off % n.max(1) };
            if let Some(x) = b.get_mut(o) { *x = val; }
        }
        for (off, val, be) in words {
            let bytes = if be { val.to_be_bytes() } else { val.to_le_bytes() };
            let o = off.min(n.saturating_sub(8));
            if o + 8 <= n { b[o..o + 8].copy_from_slice(&bytes); }
        }
        if let Some(t) = truncate { b.truncate(t.min(n)); }
        check(&b);
    }
}

#[test]
fn unmutated_seeds_are_safe() {
    for (name, b) in seeds() {
        let i = inspect(b, &InspectOptions::default()).unwrap();
        assert!(i.is_safe(), "{name}: {:?}", i.violations);
    }
}
