//! The C ABI (include/snapkv.h).
