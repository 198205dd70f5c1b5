//! Property tests: random extent lists -> every writer -> our reader -> the same disk bytes;
//! a write resumed from any of its checkpoints gives the same bytes as the write that took it.

use openims_format::io::{Extent, ExtentKind, ReadAt, VirtualDisk};
use openims_format::write::{
    write_image, write_image_resumable, AllocationBitmap, OutputFormat, WriteCheckpoint,
    WriteOptions,
};
use openims_format::{read, DiskFormat, ImageSink, MemSink, Result};
use proptest::prelude::*;
use std::sync::Arc;

/// An in-memory virtual disk described by an extent list.
struct MemDisk {
    data: Vec<u8>,
    ext: Vec<Extent>,
}

impl VirtualDisk for MemDisk {
    fn virtual_size(&self) -> u64 {
        self.data.len() as u64
    }
    fn extents(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.data.len() as u64);
        Ok(self
            .ext
            .iter()
            .filter(|e| e.offset + e.len > offset && e.offset < end)
            .map(|e| {
                let s = e.offset.max(offset);
                Extent {
                    offset: s,
                    len: (e.offset + e.len).min(end) - s,
                    kind: e.kind,
                }
            })
            .collect())
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        let n = self.data.as_slice().read_at(buf, offset)?;
        let _ = n;
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Fill {
    Hole,
    Zeros,
    Byte(u8),
    Random(u64),
}

fn fill_strategy() -> impl Strategy<Value = Fill> {
    prop_oneof![
        2 => Just(Fill::Hole),
        1 => Just(Fill::Zeros),
        1 => any::<u8>().prop_map(Fill::Byte),
        2 => any::<u64>().prop_map(Fill::Random),
    ]
}

fn build(parts: &[(u64, Fill)]) -> MemDisk {
    let mut data = Vec::new();
    let mut ext: Vec<Extent> = Vec::new();
    for (len, fill) in parts {
        let off = data.len() as u64;
        let kind = if matches!(fill, Fill::Hole) {
            ExtentKind::Zero
        } else {
            ExtentKind::Data
        };
        match fill {
            Fill::Hole | Fill::Zeros => data.resize(data.len() + *len as usize, 0),
            Fill::Byte(b) => data.resize(data.len() + *len as usize, *b),
            Fill::Random(seed) => {
                let mut x = seed | 1;
                for _ in 0..*len {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    data.push(x as u8);
                }
            }
        }
        match ext.last_mut() {
            Some(l) if l.kind == kind => l.len += len,
            _ => ext.push(Extent {
                offset: off,
                len: *len,
                kind,
            }),
        }
    }
    MemDisk { data, ext }
}

fn read_back(img: Vec<u8>, fmt: DiskFormat) -> (u64, Vec<u8>) {
    let src: Arc<dyn ReadAt> = Arc::new(img);
    let mut d = read::open(src, fmt).expect("open our output");
    let vs = d.virtual_size();
    let mut out = vec![0u8; vs as usize];
    // Odd-sized reads exercise the readers' run coalescing.
    let mut pos = 0usize;
    let mut step = 77_777usize;
    while pos < out.len() {
        let n = step.min(out.len() - pos);
        d.read_at(pos as u64, &mut out[pos..pos + n]).expect("read");
        pos += n;
        step = step * 3 % 300_001 + 1;
    }
    let ext = d.extents(0, vs).expect("extents");
    assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), vs);
    for e in ext.iter().filter(|e| e.kind == ExtentKind::Zero) {
        assert!(out[e.offset as usize..(e.offset + e.len) as usize]
            .iter()
            .all(|&b| b == 0));
    }
    (vs, out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn every_writer_roundtrips(
        parts in prop::collection::vec((1u64..300_000, fill_strategy()), 0..12),
        cluster_pow in prop_oneof![Just(9u32), Just(12), Just(16), Just(17)],
    ) {
        let mut disk = build(&parts);
        let want = disk.data.clone();
        let outs = [
            (OutputFormat::Raw, false, DiskFormat::Raw),
            (OutputFormat::RawWithBitmap, false, DiskFormat::Raw),
            (OutputFormat::Qcow2, false, DiskFormat::Qcow2),
            (OutputFormat::Qcow2, true, DiskFormat::Qcow2),
            (OutputFormat::Vhd, false, DiskFormat::Vhd),
            (OutputFormat::VhdFixed, false, DiskFormat::Vhd),
            (OutputFormat::VmdkStream, false, DiskFormat::Vmdk),
        ];
        for (of, compress, rf) in outs {
            let opts = WriteOptions {
                compress,
                cluster_size: 1 << cluster_pow,
                threads: 2,
                ..WriteOptions::default()
            };
            let mut sink = MemSink::new();
            let mut last = 0;
            let rep = write_image(&mut disk, of, &opts, &mut sink, &mut |d| {
                assert!(d >= last);
                last = d;
            }).expect("write");
            prop_assert_eq!(rep.output_size, sink.data.len() as u64);
            if of == OutputFormat::RawWithBitmap {
                let bm = AllocationBitmap::from_bytes(rep.bitmap.as_deref().expect("bitmap")).expect("parse");
                for i in 0..bm.len() {
                    let s = (i * bm.granularity()) as usize;
                    let e = (s + bm.granularity() as usize).min(want.len());
                    if !bm.get(i) {
                        prop_assert!(want[s..e].iter().all(|&b| b == 0));
                    }
                }
            }
            let (vs, got) = read_back(sink.data, rf);
            prop_assert!(vs >= want.len() as u64, "{:?}: size {} < {}", of, vs, want.len());
            prop_assert!(got[..want.len()] == want[..], "{:?} compress={} differs", of, compress);
            prop_assert!(got[want.len()..].iter().all(|&b| b == 0));
        }
    }
}

/// A memory sink that seals whenever asked and keeps what it held at each seal.
#[derive(Default)]
struct SealingSink {
    inner: MemSink,
    sealed: Vec<Vec<u8>>,
}

impl ImageSink for SealingSink {
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(buf)
    }
    fn patch(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.inner.patch(offset, buf)
    }
    fn header_window(&self) -> u64 {
        self.inner.header_window()
    }
    fn position(&self) -> u64 {
        self.inner.position()
    }
    fn seal(&mut self) -> std::io::Result<bool> {
        self.sealed.push(self.inner.data.clone());
        Ok(true)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn a_resumed_write_equals_the_uninterrupted_one(
        parts in prop::collection::vec((1u64..400_000, fill_strategy()), 1..12),
        cluster_pow in prop_oneof![Just(9u32), Just(12), Just(16)],
        every in 1u64..300_000,
        pick in any::<prop::sample::Index>(),
    ) {
        let mut disk = build(&parts);
        let outs = [
            (OutputFormat::Qcow2, false),
            (OutputFormat::Qcow2, true),
            (OutputFormat::Vhd, false),
            (OutputFormat::VmdkStream, false),
        ];
        for (of, compress) in outs {
            let opts = WriteOptions {
                compress,
                cluster_size: 1 << cluster_pow,
                threads: 2,
                ..WriteOptions::default()
            };
            let mut sink = SealingSink::default();
            let mut cps: Vec<WriteCheckpoint> = Vec::new();
            let mut on_cp = |cp: &WriteCheckpoint| {
                cps.push(cp.clone());
                Ok(())
            };
            write_image_resumable(&mut disk, of, &opts, &mut sink, &mut |_| {}, None,
                                  Some((every, &mut on_cp))).expect("write");
            let whole = sink.inner.data.clone();
            prop_assert_eq!(cps.len(), sink.sealed.len());
            if cps.is_empty() {
                continue;
            }
            let i = pick.index(cps.len());
            let cp = &cps[i];
            prop_assert_eq!(cp.position, sink.sealed[i].len() as u64);
            let mut again = MemSink { data: sink.sealed[i].clone() };
            write_image_resumable(&mut disk, of, &opts, &mut again, &mut |_| {}, Some(cp), None)
                .expect("resume");
            prop_assert!(again.data == whole, "{:?} compress={} resumed from {:?} differs", of, compress, cp.next_unit);
        }
    }
}

/// Valid small images of every readable output format, made by our writers.
fn seed_images() -> Vec<(Vec<u8>, DiskFormat)> {
    let parts = vec![
        (70_000u64, Fill::Random(7)),
        (200_000, Fill::Hole),
        (90_000, Fill::Byte(3)),
        (3 << 20, Fill::Hole),
        (5_000, Fill::Random(9)),
    ];
    let mut out = Vec::new();
    for (of, c, rf, cs) in [
        (OutputFormat::Qcow2, false, DiskFormat::Qcow2, 4096u32),
        (OutputFormat::Qcow2, true, DiskFormat::Qcow2, 4096),
        (OutputFormat::Vhd, false, DiskFormat::Vhd, 65536),
        (OutputFormat::VhdFixed, false, DiskFormat::Vhd, 65536),
        (OutputFormat::VmdkStream, false, DiskFormat::Vmdk, 65536),
    ] {
        let mut disk = build(&parts);
        let opts = WriteOptions {
            compress: c,
            cluster_size: cs,
            ..WriteOptions::default()
        };
        let mut sink = MemSink::new();
        write_image(&mut disk, of, &opts, &mut sink, &mut |_| {}).expect("write");
        out.push((sink.data, rf));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Hostile input: mutated/truncated images never panic or allocate without bound; they
    /// open and read, or fail with an error.
    #[test]
    fn mutated_images_never_panic(
        which in 0usize..5,
        muts in prop::collection::vec((0usize..70_000, any::<u8>()), 1..24),
        cut in prop::option::of(0usize..400_000),
        as_fmt in prop_oneof![Just(None), Just(Some(DiskFormat::Vhdx)), Just(Some(DiskFormat::Vdi)), Just(Some(DiskFormat::Raw))],
    ) {
        let seeds = seed_images();
        let (mut img, fmt) = seeds[which].clone();
        let len = img.len();
        for (pos, v) in muts {
            // Mutate the head (headers, tables) and the tail (footers).
            let p = if pos % 2 == 0 { pos % len } else { len - 1 - (pos % len) };
            img[p] = v;
        }
        if let Some(c) = cut {
            img.truncate(c.min(img.len()));
        }
        let src: Arc<dyn ReadAt> = Arc::new(img);
        if let Ok(mut d) = read::open(src, as_fmt.unwrap_or(fmt)) {
            let vs = d.virtual_size();
            let _ = d.extents(0, vs.min(1 << 30));
            let mut buf = vec![0u8; (vs.min(4 << 20)) as usize];
            let _ = d.read_at(0, &mut buf);
            let n = buf.len().min(5000);
            let _ = d.read_at(vs.saturating_sub(1000), &mut buf[..n]);
        }
    }
}
