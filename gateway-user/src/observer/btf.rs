//! Just enough of a BTF reader to find one struct member's byte offset in the running kernel.
//!
//! The eBPF side reads `sk->sk_err` and `sk->sk_err_soft` in the sock_ops STATE callback when a
//! connect leaves SYN_SENT (docs/kernel.md, "When the outcome is known"), the socket's cookie in
//! getsockopt, and the syscall number from `struct pt_regs` in the raw `sys_exit` tracepoint.
//! Rust eBPF programs
//! have no CO-RE relocations, so the loader looks the offsets up in `/sys/kernel/btf/vmlinux` and
//! passes them in as load-time globals. aya parses BTF too but keeps that API private.
//! Format: Documentation/bpf/btf.rst (the header, then `struct btf_type` records whose
//! trailing data depends on the kind).

use std::path::Path;

use thiserror::Error;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error(
        "this kernel exposes no BTF at {path} ({source}); the observer needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y"
    )]
    Missing {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid BTF: {reason}")]
    Malformed { path: String, reason: &'static str },
    #[error("struct {structure} has no member {member} in {path}")]
    NoSuchMember {
        path: String,
        structure: String,
        member: String,
    },
}

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// The syscall-number member of `struct pt_regs` in this architecture's kernel BTF.
#[cfg(target_arch = "x86_64")]
const PT_REGS_SYSCALL_NR: &str = "orig_ax";
#[cfg(target_arch = "aarch64")]
const PT_REGS_SYSCALL_NR: &str = "syscallno";

/// Where the eBPF programs find what they read in kernel structures, in the running kernel.
pub struct KernelOffsets {
    /// `offsetof(struct sock, sk_err)`.
    pub sk_err: u32,
    /// `offsetof(struct sock, sk_err_soft)`.
    pub sk_err_soft: u32,
    /// `offsetof(struct sock, __sk_common.skc_cookie)`.
    pub sk_cookie: u32,
    /// The syscall number's offset in `struct pt_regs`.
    pub syscall_nr: u32,
}

/// The [`KernelOffsets`] of the running kernel, from [`VMLINUX_BTF`].
pub fn kernel_offsets() -> Result<KernelOffsets, BtfError> {
    let at = |structure, member| member_offset(Path::new(VMLINUX_BTF), structure, member);
    Ok(KernelOffsets {
        sk_err: at("sock", "sk_err")?,
        sk_err_soft: at("sock", "sk_err_soft")?,
        sk_cookie: at("sock", "__sk_common")? + at("sock_common", "skc_cookie")?,
        syscall_nr: at("pt_regs", PT_REGS_SYSCALL_NR)?,
    })
}

/// Byte offset of `structure.member` in the BTF file at `path`.
pub fn member_offset(path: &Path, structure: &str, member: &str) -> Result<u32, BtfError> {
    let display = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| BtfError::Missing {
        path: display.clone(),
        source,
    })?;
    member_offset_in(&data, structure, member).map_err(|e| match e {
        Lookup::Malformed(reason) => BtfError::Malformed {
            path: display,
            reason,
        },
        Lookup::NotFound => BtfError::NoSuchMember {
            path: display,
            structure: structure.to_owned(),
            member: member.to_owned(),
        },
    })
}

#[derive(Debug, PartialEq)]
enum Lookup {
    Malformed(&'static str),
    NotFound,
}

fn u16_at(d: &[u8], at: usize) -> Result<u16, Lookup> {
    d.get(at..at + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or(Lookup::Malformed("truncated"))
}

fn u32_at(d: &[u8], at: usize) -> Result<u32, Lookup> {
    d.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(Lookup::Malformed("truncated"))
}

fn member_offset_in(d: &[u8], structure: &str, member: &str) -> Result<u32, Lookup> {
    if u16_at(d, 0)? != BTF_MAGIC {
        return Err(Lookup::Malformed(
            "bad magic (only little-endian BTF is supported)",
        ));
    }
    let hdr_len = u32_at(d, 4)? as usize;
    let type_off = u32_at(d, 8)? as usize;
    let type_len = u32_at(d, 12)? as usize;
    let str_off = u32_at(d, 16)? as usize;
    let str_len = u32_at(d, 20)? as usize;
    let types = d
        .get(hdr_len + type_off..hdr_len + type_off + type_len)
        .ok_or(Lookup::Malformed("type section out of bounds"))?;
    let strings = d
        .get(hdr_len + str_off..hdr_len + str_off + str_len)
        .ok_or(Lookup::Malformed("string section out of bounds"))?;
    let name = |off: u32| -> &[u8] {
        let s = strings.get(off as usize..).unwrap_or(&[]);
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    };

    let mut at = 0;
    while at + 12 <= types.len() {
        let name_off = u32_at(types, at)?;
        let info = u32_at(types, at + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        at += 12;
        let trailing = match kind {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
            KIND_ARRAY => 12,
            KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
            KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
            _ => 0,
        };
        if kind == KIND_STRUCT && name(name_off) == structure.as_bytes() {
            for m in 0..vlen {
                let base = at + m * 12;
                if name(u32_at(types, base)?) == member.as_bytes() {
                    let raw = u32_at(types, base + 8)?;
                    // With kind_flag the low 24 bits are the bit offset, the top 8 the
                    // bitfield size.
                    let bits = if kind_flag { raw & 0x00ff_ffff } else { raw };
                    return Ok(bits / 8);
                }
            }
            return Err(Lookup::NotFound);
        }
        at += trailing;
    }
    Err(Lookup::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sk_err_in_the_running_kernel() {
        // vmlinux BTF is world-readable; every machine of this kind has it (docs/kernel.md).
        let off = member_offset(Path::new(VMLINUX_BTF), "sock", "sk_err").expect("sk_err offset");
        // struct sock starts with struct sock_common (>= 100 bytes); sk_err comes well after.
        assert!(off > 100 && off < 1024, "implausible offset {off}");
        let other =
            member_offset(Path::new(VMLINUX_BTF), "sock", "sk_err_soft").expect("sk_err_soft");
        assert_ne!(off, other);
    }

    #[test]
    fn unknown_member_and_garbage_are_errors() {
        assert!(matches!(
            member_offset(Path::new(VMLINUX_BTF), "sock", "no_such_member"),
            Err(BtfError::NoSuchMember { .. })
        ));
        assert_eq!(
            member_offset_in(&[0u8; 32], "sock", "sk_err"),
            Err(Lookup::Malformed(
                "bad magic (only little-endian BTF is supported)"
            ))
        );
        assert!(matches!(
            member_offset(Path::new("/nonexistent/btf"), "sock", "sk_err"),
            Err(BtfError::Missing { .. })
        ));
    }
}
