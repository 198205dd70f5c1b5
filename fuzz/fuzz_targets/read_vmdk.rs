#![no_main]

use libfuzzer_sys::fuzz_target;
use openims_format::DiskFormat;

fuzz_target!(|data: &[u8]| {
    // Sparse extents (monolithicSparse, streamOptimized): KDMV forced. Text descriptors are
    // fuzzed as they are (the reader refuses their external extents, but must do so safely).
    let file = if data.starts_with(b"#") {
        data.to_vec()
    } else {
        openims_format_fuzz::force(data, 0, b"KDMV")
    };
    openims_format_fuzz::check_read(file, DiskFormat::Vmdk);
});
