#![no_main]

use libfuzzer_sys::fuzz_target;
use openims_format::DiskFormat;

fuzz_target!(|data: &[u8]| {
    // Fixed or dynamic, footer and dynamic header checksums repaired.
    openims_format_fuzz::check_read(openims_format_fuzz::vhd(data), DiskFormat::Vhd);
});
