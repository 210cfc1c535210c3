//! The `vmcall` transport: decodes a `KVM_EXIT_HYPERCALL` into the request block's address
//! (docs/pv-abi.md: `rax` = [`hypercall::VMCALL_NR`], `rbx` = block GPA, `rcx` = 1, `rdx` = 0).

use hypercall::HcError;

/// The request block address of a well-formed pvmm `vmcall`, or the error to return in
/// `rax` without dispatching (ENOSYS for another hypercall number, EINVAL for bad `rcx`/`rdx`).
pub fn decode(nr: u64, args: &[u64; 6]) -> Result<u64, HcError> {
    if nr != hypercall::VMCALL_NR {
        return Err(HcError::Enosys);
    }
    match args {
        [gpa, 1, 0, ..] => Ok(*gpa),
        _ => Err(HcError::Einval),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_only_pvmm_calls() {
        let nr = hypercall::VMCALL_NR;
        assert_eq!(decode(nr, &[0x1000, 1, 0, 0, 0, 0]), Ok(0x1000));
        assert_eq!(
            decode(nr + 1, &[0x1000, 1, 0, 0, 0, 0]),
            Err(HcError::Enosys)
        );
        assert_eq!(decode(nr, &[0x1000, 2, 0, 0, 0, 0]), Err(HcError::Einval));
        assert_eq!(decode(nr, &[0x1000, 1, 5, 0, 0, 0]), Err(HcError::Einval));
    }
}
