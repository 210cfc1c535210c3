//! The compiler's memory intrinsics (there is no libc): `rep movs`/`rep stos` based.

/// `memcpy`.
///
/// # Safety
/// `d` and `s` are valid for `n` bytes and do not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; quadwords first, then the remaining bytes.
    unsafe {
        core::arch::asm!("rep movsq", "mov rcx, {r}", "rep movsb", r = in(reg) n & 7,
            inout("rdi") d => _, inout("rsi") s => _, inout("rcx") n / 8 => _, options(nostack));
    }
    d
}

/// `memmove`.
///
/// # Safety
/// `d` and `s` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) <= (s as usize) || (d as usize) >= (s as usize) + n {
        // SAFETY: a forward copy is correct when the destination starts below the source
        // or past its end.
        unsafe { memcpy(d, s, n) }
    } else {
        // SAFETY: the caller's contract; a backward copy for an overlapping destination.
        unsafe {
            core::arch::asm!("std", "rep movsb", "cld", inout("rdi") d.add(n - 1) => _,
                inout("rsi") s.add(n - 1) => _, inout("rcx") n => _, options(nostack));
        }
        d
    }
}

/// `memset`.
///
/// # Safety
/// `d` is valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe {
        core::arch::asm!("rep stosb", inout("rdi") d => _, inout("rcx") n => _, in("al") c as u8,
            options(nostack));
    }
    d
}

/// `memcmp`.
///
/// # Safety
/// `a` and `b` are valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, inside both buffers (the caller's contract).
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// `bcmp`.
///
/// # Safety
/// As [`memcmp`].
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
