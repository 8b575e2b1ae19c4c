//! The version guard: the interposer acts only in a host whose llama.cpp
//! has the API and the struct layouts this library was built against.
//!
//! A ggml version string is not enough (trees with the same version differ
//! in llama.h), and the host carries no copy of its headers. What the host
//! does carry is checked against the pinned llama.h:
//! - every function llama.h declares (the list is extracted at build time)
//!   is defined in the process: an added, removed or renamed function in
//!   our llama.h fails this;
//! - on x86-64, the structs the interposer writes or builds —
//!   `llama_context_params` (the observer's callback fields) and
//!   `llama_batch` (the library's own decodes) — have our size: the host's
//!   `llama_context_default_params` and `llama_batch_get_one` are called
//!   with a canary-filled return buffer, and the bytes they write must end
//!   in the last 8-byte word of our struct.
//!
//! A host that fails any check gets one line and a pass-through.

use std::ffi::CString;

use super::real::defined_in_process;
use crate::sys;

/// The functions the pinned llama.h declares, one per line.
const LLAMA_API_FUNCTIONS: &str = include_str!(concat!(env!("OUT_DIR"), "/llama_api_functions.txt"));

/// Checks the host; `Err` is the reason to pass through.
pub(crate) fn check_host() -> Result<(), String> {
    let mut missing = Vec::new();
    for name in LLAMA_API_FUNCTIONS.lines().filter(|l| !l.is_empty()) {
        let Ok(c) = CString::new(name) else { continue };
        if !defined_in_process(&c) {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        return Err(format!(
            "the host's llama.cpp lacks {} function(s) of the llama.h this library was built against ({}{}): it is \
             another llama.cpp",
            missing.len(),
            missing[..missing.len().min(3)].join(", "),
            if missing.len() > 3 { ", …" } else { "" }
        ));
    }
    check_layouts()
}

#[cfg(target_arch = "x86_64")]
fn check_layouts() -> Result<(), String> {
    use std::mem::size_of;
    let ours = size_of::<sys::llama_context_params>();
    let host = written_extent(|buf| {
        // On x86-64 a function returning a struct of this size (class
        // MEMORY) takes the return buffer's address as a hidden first
        // argument and returns it.
        // SAFETY: that ABI; the buffer exceeds any plausible struct size.
        unsafe { sret_probe(sys::llama_context_default_params as *const () as usize)(buf.as_mut_ptr()) };
    });
    check_size("llama_context_params", ours, host)?;
    let ours = size_of::<sys::llama_batch>();
    let host = written_extent(|buf| {
        // SAFETY: as above; llama_batch_get_one only stores the two
        // arguments into the returned struct (null tokens, 0 of them).
        unsafe {
            sret_probe_2(sys::llama_batch_get_one as *const () as usize)(buf.as_mut_ptr(), std::ptr::null_mut(), 0)
        };
    });
    check_size("llama_batch", ours, host)
}

#[cfg(not(target_arch = "x86_64"))]
fn check_layouts() -> Result<(), String> {
    Ok(())
}

fn check_size(name: &str, ours: usize, host: usize) -> Result<(), String> {
    if host > ours || host + 8 <= ours {
        return Err(format!(
            "the host's {name} is about {host} bytes, this library's {ours}: it is another llama.cpp"
        ));
    }
    Ok(())
}

/// How many leading bytes of a buffer `fill` writes: the buffer is filled
/// with two different canaries in turn, and a byte counts as written when
/// it differs from the canary in either run.
fn written_extent(mut fill: impl FnMut(&mut [u8; PROBE_BYTES])) -> usize {
    let mut extent = 0;
    for canary in [0xA5u8, 0x5A] {
        let mut buf = [canary; PROBE_BYTES];
        fill(&mut buf);
        if let Some(last) = buf.iter().rposition(|&b| b != canary) {
            extent = extent.max(last + 1);
        }
    }
    extent
}

const PROBE_BYTES: usize = 4096;

#[cfg(target_arch = "x86_64")]
type SretProbe = unsafe extern "C" fn(*mut u8) -> *mut u8;
#[cfg(target_arch = "x86_64")]
type SretProbe2 = unsafe extern "C" fn(*mut u8, *mut sys::llama_token, i32) -> *mut u8;

#[cfg(target_arch = "x86_64")]
fn sret_probe(address: usize) -> SretProbe {
    // SAFETY: `address` is a function's address; the caller's SAFETY
    // comment explains why this signature matches its ABI.
    unsafe { std::mem::transmute::<usize, SretProbe>(address) }
}

#[cfg(target_arch = "x86_64")]
fn sret_probe_2(address: usize) -> SretProbe2 {
    // SAFETY: as in `sret_probe`.
    unsafe { std::mem::transmute::<usize, SretProbe2>(address) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_function_list_is_llama_h_s() {
        let names: Vec<&str> = LLAMA_API_FUNCTIONS.lines().collect();
        assert!(names.len() > 200, "{} functions", names.len());
        for f in [
            "llama_process",
            "llama_init_from_model",
            "llama_memory_seq_pos_min",
            "llama_new_context_with_model",
        ] {
            assert!(names.contains(&f), "{f} missing");
        }
        assert!(
            !names.contains(&"llama_decode_with_sampler"),
            "commented out in llama.h"
        );
    }

    #[test]
    fn sizes_must_end_in_our_last_word() {
        assert!(check_size("s", 120, 120).is_ok());
        assert!(check_size("s", 120, 113).is_ok(), "tail padding left unwritten");
        assert!(check_size("s", 120, 128).is_err(), "a field added");
        assert!(check_size("s", 120, 112).is_err(), "a field removed");
    }

    #[test]
    fn the_written_extent_sees_bytes_equal_to_one_canary() {
        let extent = written_extent(|buf| {
            buf[..10].fill(0);
            buf[10] = 0xA5;
        });
        assert_eq!(extent, 11);
    }
}
