//! The host's own llama.cpp functions behind the ones we interpose, found
//! with `dlsym(RTLD_NEXT, …)`: the next definition after this library in
//! the process's lookup order, which is the host's `libllama`.
//!
//! Functions we do not interpose need nothing here: their undefined
//! references in this library bind to the host's definitions when it is
//! loaded.

use std::ffi::{c_char, c_void, CStr};
use std::sync::OnceLock;

use crate::sys;

extern "C" {
    /// glibc's `dlsym` (the C library every host links).
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

/// glibc's `RTLD_NEXT`: search the libraries loaded after the caller's.
const RTLD_NEXT: *mut c_void = -1isize as *mut c_void;
/// glibc's `RTLD_DEFAULT`: the process's global lookup order.
const RTLD_DEFAULT: *mut c_void = std::ptr::null_mut();

/// Whether the process defines a function or variable named `name`
/// anywhere (the host's libllama included).
pub(super) fn defined_in_process(name: &CStr) -> bool {
    // SAFETY: dlsym only reads the NUL-terminated name; RTLD_DEFAULT is a
    // valid pseudo-handle on glibc.
    !unsafe { dlsym(RTLD_DEFAULT, name.as_ptr()) }.is_null()
}

macro_rules! host_functions {
    ($( $name:ident : fn($($ty:ty),*) $(-> $ret:ty)? ;)*) => {
        $(
            /// The host's definition of this function, resolved on first
            /// use; `None` when the host's libllama lacks it.
            pub(super) fn $name() -> Option<unsafe extern "C" fn($($ty),*) $(-> $ret)?> {
                static ADDRESS: OnceLock<usize> = OnceLock::new();
                const NAME: &CStr = match CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes()) {
                    Ok(n) => n,
                    Err(_) => panic!("NUL in a symbol name"),
                };
                // SAFETY: dlsym reads the NUL-terminated name; RTLD_NEXT
                // is a valid pseudo-handle on glibc.
                let address = *ADDRESS.get_or_init(|| unsafe { dlsym(RTLD_NEXT, NAME.as_ptr()) } as usize);
                if address == 0 {
                    return None;
                }
                // The bindings come from the pinned llama.h; the version
                // guard refuses to act on a host whose llama.cpp differs.
                // SAFETY: the host's function of this name, with llama.h's signature.
                Some(unsafe { std::mem::transmute::<usize, unsafe extern "C" fn($($ty),*) $(-> $ret)?>(address) })
            }
        )*
    };
}

host_functions! {
    llama_init_from_model: fn(*mut sys::llama_model, sys::llama_context_params) -> *mut sys::llama_context;
    llama_free: fn(*mut sys::llama_context);
    llama_decode: fn(*mut sys::llama_context, sys::llama_batch) -> i32;
    llama_process: fn(*mut sys::llama_context, sys::llama_process_type, *mut sys::llama_batch_ext) -> i32;
    llama_batch_ext_free: fn(*mut sys::llama_batch_ext);
    llama_batch_ext_clear: fn(*mut sys::llama_batch_ext);
    llama_batch_ext_add: fn(*mut sys::llama_batch_ext, sys::llama_seq_id) -> i32;
    llama_batch_ext_add_token: fn(*mut sys::llama_batch_ext, sys::llama_seq_id, sys::llama_token) -> i32;
    llama_batch_ext_add_embd: fn(*mut sys::llama_batch_ext, sys::llama_seq_id, sys::llama_embd) -> i32;
    llama_batch_ext_add_seq: fn(*mut sys::llama_batch_ext, i32, sys::llama_seq_id) -> bool;
    llama_batch_ext_set_pos: fn(*mut sys::llama_batch_ext, i32, *const sys::llama_pos) -> bool;
    llama_batch_ext_set_output_logits: fn(*mut sys::llama_batch_ext, i32, bool) -> bool;
    llama_batch_ext_set_output_embd: fn(*mut sys::llama_batch_ext, i32, bool) -> bool;
    llama_memory_clear: fn(sys::llama_memory_t, bool);
    llama_memory_seq_rm: fn(sys::llama_memory_t, sys::llama_seq_id, sys::llama_pos, sys::llama_pos) -> bool;
    llama_memory_seq_cp: fn(sys::llama_memory_t, sys::llama_seq_id, sys::llama_seq_id, sys::llama_pos, sys::llama_pos);
    llama_memory_seq_keep: fn(sys::llama_memory_t, sys::llama_seq_id);
    llama_memory_seq_add: fn(sys::llama_memory_t, sys::llama_seq_id, sys::llama_pos, sys::llama_pos, sys::llama_pos);
    llama_memory_seq_pos_min: fn(sys::llama_memory_t, sys::llama_seq_id) -> sys::llama_pos;
    llama_state_seq_get_data_ext: fn(*mut sys::llama_context, *mut u8, usize, sys::llama_seq_id, sys::llama_state_seq_flags) -> usize;
    llama_state_seq_set_data_ext: fn(*mut sys::llama_context, *const u8, usize, sys::llama_seq_id, sys::llama_state_seq_flags) -> usize;
    llama_state_seq_get_data: fn(*mut sys::llama_context, *mut u8, usize, sys::llama_seq_id) -> usize;
    llama_state_seq_set_data: fn(*mut sys::llama_context, *const u8, usize, sys::llama_seq_id) -> usize;
}
