#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let vdi_magic = 0xbeda_107fu32.to_le_bytes();
    if data.starts_with(b"QED\0") || data.get(0x40..0x44) == Some(&vdi_magic[..]) {
        openims_format_fuzz::check(data.to_vec());
    } else if data.first().is_some_and(|b| b & 1 == 1) {
        openims_format_fuzz::check(openims_format_fuzz::force(data, 0x40, &vdi_magic));
    } else {
        openims_format_fuzz::check(openims_format_fuzz::force(data, 0, b"QED\0"));
    }
});
