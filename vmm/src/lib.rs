//! pvmm library.
