#![no_main]

use libfuzzer_sys::fuzz_target;
use openims_format::DiskFormat;

fuzz_target!(|data: &[u8]| {
    // Magic forced; version, cluster bits, compression type (zlib/zstd) are the fuzzer's.
    let file = openims_format_fuzz::force(data, 0, b"QFI\xfb");
    openims_format_fuzz::check_read(file, DiskFormat::Qcow2);
});
