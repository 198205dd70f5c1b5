#![no_main]

use libfuzzer_sys::fuzz_target;
use openims_format::DiskFormat;

fuzz_target!(|data: &[u8]| {
    let file = openims_format_fuzz::force(data, 0x40, &0xbeda_107fu32.to_le_bytes());
    openims_format_fuzz::check_read(file, DiskFormat::Vdi);
});
