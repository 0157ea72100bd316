//! The errno values the observer cares about, and their symbolic names.

pub const EPERM: u32 = 1;
pub const EINTR: u32 = 4;
pub const EACCES: u32 = 13;
pub const EPIPE: u32 = 32;
pub const EPROTO: u32 = 71;
pub const EMSGSIZE: u32 = 90;
pub const EOPNOTSUPP: u32 = 95;
pub const EADDRINUSE: u32 = 98;
pub const EADDRNOTAVAIL: u32 = 99;
pub const ENETDOWN: u32 = 100;
pub const ENETUNREACH: u32 = 101;
pub const ECONNABORTED: u32 = 103;
pub const ECONNRESET: u32 = 104;
pub const ETIMEDOUT: u32 = 110;
pub const ECONNREFUSED: u32 = 111;
pub const EHOSTDOWN: u32 = 112;
pub const EHOSTUNREACH: u32 = 113;
pub const EINPROGRESS: u32 = 115;
pub const ENONET: u32 = 64;

/// Slots of [`crate::DestStats::so_errors`].
pub const SO_ERROR_SLOTS: usize = 8;

/// Which `so_errors` slot counts an errno read through `getsockopt(SO_ERROR)`.
pub const fn so_error_slot(err: u32) -> usize {
    match err {
        ETIMEDOUT => 0,
        ECONNREFUSED => 1,
        EHOSTUNREACH => 2,
        ENETUNREACH => 3,
        EADDRNOTAVAIL => 4,
        ECONNRESET => 5,
        EPIPE => 6,
        _ => 7,
    }
}

/// The errno each `so_errors` slot stands for; `None` for the catch-all slot.
pub const SO_ERROR_SLOT_ERRNO: [Option<u32>; SO_ERROR_SLOTS] = [
    Some(ETIMEDOUT),
    Some(ECONNREFUSED),
    Some(EHOSTUNREACH),
    Some(ENETUNREACH),
    Some(EADDRNOTAVAIL),
    Some(ECONNRESET),
    Some(EPIPE),
    None,
];

/// Symbolic name of an errno, e.g. `ETIMEDOUT`; `None` for values this table does not know.
pub const fn name(err: u32) -> Option<&'static str> {
    Some(match err {
        EPERM => "EPERM",
        EINTR => "EINTR",
        EACCES => "EACCES",
        EPIPE => "EPIPE",
        ENONET => "ENONET",
        EPROTO => "EPROTO",
        EMSGSIZE => "EMSGSIZE",
        EOPNOTSUPP => "EOPNOTSUPP",
        EADDRINUSE => "EADDRINUSE",
        EADDRNOTAVAIL => "EADDRNOTAVAIL",
        ENETDOWN => "ENETDOWN",
        ENETUNREACH => "ENETUNREACH",
        ECONNABORTED => "ECONNABORTED",
        ECONNRESET => "ECONNRESET",
        ETIMEDOUT => "ETIMEDOUT",
        ECONNREFUSED => "ECONNREFUSED",
        EHOSTDOWN => "EHOSTDOWN",
        EHOSTUNREACH => "EHOSTUNREACH",
        EINPROGRESS => "EINPROGRESS",
        _ => return None,
    })
}
