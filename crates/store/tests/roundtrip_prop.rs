mod common;

use common::*;
use openims_format::VirtualDisk;
use openims_store::{MemBackend, Store, StoreConfig};
use proptest::prelude::*;
use std::io::Read;
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Fill {
    Random(u64),
    Zeros,
    /// Copy of the bytes at this offset (creates repeated chunks when aligned).
    CopyFrom(u64),
}

fn disk_strategy() -> impl Strategy<Value = (u32, MemDisk)> {
    (
        prop_oneof![Just(512u32), Just(1024), Just(4096)],
        0u64..40_000,
        prop::collection::vec(
            (
                0u64..40_000,
                1usize..9000,
                prop_oneof![
                    any::<u64>().prop_map(Fill::Random),
                    Just(Fill::Zeros),
                    (0u64..40_000).prop_map(Fill::CopyFrom)
                ],
            ),
            0..8,
        ),
    )
        .prop_map(|(cs, size, writes)| {
            let mut d = MemDisk::new(size);
            for (off, len, fill) in writes {
                let bytes = match fill {
                    Fill::Random(seed) => random_bytes(seed, len),
                    Fill::Zeros => vec![0u8; len],
                    Fill::CopyFrom(src) => {
                        let mut b = vec![0u8; len];
                        let _ = d.read_at(src, &mut b);
                        b
                    }
                };
                // Align some writes to the chunk size to create identical chunks.
                let off = if len % 2 == 0 {
                    off / u64::from(cs) * u64::from(cs)
                } else {
                    off
                };
                d.write(off, &bytes);
            }
            (cs, d)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn random_disks_round_trip((cs, disk) in disk_strategy(), workers in 1usize..4) {
        let b = Arc::new(MemBackend::new());
        let s = Store::open(Arc::clone(&b), StoreConfig {
            chunk_size: cs,
            ingest_workers: workers,
            ..StoreConfig::default()
        }).expect("store");
        let r = s.ingest(&mut disk.clone(), &mut |_| {}).expect("ingest");
        let m = s.manifest(&r.manifest_id).expect("manifest");
        prop_assert_eq!(m.virtual_size(), disk.data.len() as u64);
        prop_assert_eq!(r.stored_chunks as usize, m.stored_chunks().len());
        prop_assert_eq!(r.new_chunks, r.stored_chunks);
        prop_assert_eq!(r.zero_chunks as usize, m.chunks().iter().filter(|c| c.is_none()).count());
        // Stored objects: exactly the distinct chunks plus the manifest.
        prop_assert_eq!(b.len(), m.stored_chunks().len() + 1);

        let mut out = Vec::new();
        s.stream_raw(&r.manifest_id).expect("stream").read_to_end(&mut out).expect("read");
        prop_assert!(out == disk.data, "stream mismatch");

        // Unaligned reads through the VirtualDisk.
        let mut md = s.open_disk(&r.manifest_id).expect("open");
        let size = disk.data.len();
        for (off, len) in [(0usize, 7usize), (size / 3, 1500), (size.saturating_sub(5), 10)] {
            let mut got = vec![1u8; len];
            md.read_at(off as u64, &mut got).expect("read_at");
            let mut want = vec![0u8; len];
            let _ = disk.clone().read_at(off as u64, &mut want);
            prop_assert!(got == want, "read_at {} {}", off, len);
        }

        // Re-ingest: same manifest, nothing new.
        let r2 = s.ingest(&mut disk.clone(), &mut |_| {}).expect("ingest 2");
        prop_assert_eq!(r2.manifest_id, r.manifest_id);
        prop_assert_eq!(r2.new_chunks, 0);
        prop_assert!(s.fsck(&[r.manifest_id]).expect("fsck").is_clean());
    }
}
