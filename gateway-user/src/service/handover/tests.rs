use super::*;

#[test]
fn entries_name_descriptor_role_and_configured_address() {
    assert_eq!(
        parse_entry("7:client:127.0.0.1:0").unwrap(),
        (7, Role::Client, "127.0.0.1:0".parse().unwrap())
    );
    assert_eq!(
        parse_entry("9:admin:[::1]:9901").unwrap(),
        (9, Role::Admin, "[::1]:9901".parse().unwrap())
    );
    for bad in [
        "x:client:127.0.0.1:1",
        "1:client:127.0.0.1:1",
        "5:web:127.0.0.1:1",
        "5:client:nowhere",
    ] {
        assert!(parse_entry(bad).is_err(), "{bad}");
    }
}

#[test]
fn only_listening_stream_sockets_are_adopted() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = inheritable(listener.as_raw_fd()).unwrap();
    let raw = fd.as_raw_fd();
    std::mem::forget(fd);
    let adopted = adopt(raw, Role::Client, addr).unwrap();
    assert_eq!(adopted.local_addr().unwrap(), addr);
    // SAFETY: F_GETFD on a descriptor we own.
    assert_ne!(
        unsafe { libc::fcntl(raw, libc::F_GETFD) } & libc::FD_CLOEXEC,
        0
    );

    let connected = std::net::TcpStream::connect(addr).unwrap();
    let err = adopt(
        inheritable(connected.as_raw_fd())
            .map(|f| {
                let r = f.as_raw_fd();
                std::mem::forget(f);
                r
            })
            .unwrap(),
        Role::Client,
        addr,
    )
    .map(|_| ())
    .unwrap_err();
    assert!(
        err.to_string().contains("not a listening TCP socket"),
        "{err}"
    );
}
