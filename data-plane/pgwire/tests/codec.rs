use bytes::BytesMut;
use gatehouse_pgwire::*;

#[test]
fn startup_packets_decode_incrementally() {
    let mut full = BytesMut::new();
    startup_message(&mut full, [("user", "alice"), ("database", "app")]);
    ssl_request(&mut full);
    cancel_request(&mut full, 7, -9);
    // Feed one byte at a time: never a partial decode, never an error.
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in full.iter() {
        buf.extend_from_slice(&[*b]);
        while let Some(p) = decode_startup(&mut buf, 1 << 16).unwrap() {
            got.push(p);
        }
    }
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].param("user"), Some("alice"));
    assert_eq!(got[0].param("database"), Some("app"));
    assert_eq!(got[1], StartupPacket::SslRequest);
    assert_eq!(
        got[2],
        StartupPacket::CancelRequest {
            process_id: 7,
            secret_key: -9
        }
    );
    assert!(buf.is_empty());
}

#[test]
fn startup_rejects_bad_lengths_and_versions() {
    let mut buf = BytesMut::from(&[0u8, 0, 0, 4, 0, 0, 0, 0][..]);
    assert_eq!(
        decode_startup(&mut buf, 100),
        Err(ProtocolError::BadLength(4))
    );
    let mut buf = BytesMut::from(&[0u8, 0, 0, 8, 0, 2, 0, 0][..]);
    assert!(matches!(
        decode_startup(&mut buf, 100),
        Err(ProtocolError::UnsupportedVersion { major: 2, minor: 0 })
    ));
    let mut buf = BytesMut::from(&[0u8, 1, 0, 0, 0, 3, 0, 0][..]);
    assert!(matches!(
        decode_startup(&mut buf, 100),
        Err(ProtocolError::TooLarge { .. })
    ));
}

fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = decode_frame(&mut buf, 1 << 20).unwrap() {
        out.push(f);
    }
    assert!(buf.is_empty(), "leftover bytes");
    out
}

fn bind_body(portal: &str, stmt: &str, formats: &[i16], params: &[Option<&[u8]>]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(portal.as_bytes());
    b.push(0);
    b.extend_from_slice(stmt.as_bytes());
    b.push(0);
    b.extend_from_slice(&(formats.len() as i16).to_be_bytes());
    for f in formats {
        b.extend_from_slice(&f.to_be_bytes());
    }
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        match p {
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v);
            }
        }
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    b
}

#[test]
fn extended_protocol_messages_parse() {
    let mut wire = Vec::new();
    wire.extend_from_slice(&Frame::new(b'P', b"s1\0select $1, $2\0\0\x02\0\0\0\x17\0\0\0\x19").raw);
    wire.extend_from_slice(
        &Frame::new(b'B', &bind_body("p1", "s1", &[0, 1], &[Some(b"42"), None])).raw,
    );
    wire.extend_from_slice(&Frame::new(b'D', b"Pp1\0").raw);
    wire.extend_from_slice(&Frame::new(b'E', b"p1\0\0\0\0\x0a").raw);
    wire.extend_from_slice(&Frame::new(b'C', b"Ss1\0").raw);
    wire.extend_from_slice(&Frame::new(b'S', b"").raw);
    let f = frames(&wire);
    let msgs: Vec<_> = f
        .iter()
        .map(|f| FrontendMessage::parse(f).unwrap())
        .collect();
    assert_eq!(
        msgs[0],
        FrontendMessage::Parse(Parse {
            statement: "s1",
            query: b"select $1, $2",
            param_types: vec![23, 25],
        })
    );
    let FrontendMessage::Bind(bind) = &msgs[1] else {
        panic!("not a bind: {:?}", msgs[1])
    };
    assert_eq!((bind.portal, bind.statement), ("p1", "s1"));
    assert_eq!(bind.params, vec![Some(&b"42"[..]), None]);
    assert_eq!((bind.param_format(0), bind.param_format(1)), (0, 1));
    assert_eq!(
        msgs[2],
        FrontendMessage::Describe {
            kind: b'P',
            name: "p1"
        }
    );
    assert_eq!(
        msgs[3],
        FrontendMessage::Execute {
            portal: "p1",
            max_rows: 10
        }
    );
    assert_eq!(
        msgs[4],
        FrontendMessage::Close {
            kind: b'S',
            name: "s1"
        }
    );
    assert_eq!(msgs[5], FrontendMessage::Sync);
}

#[test]
fn statement_text_is_raw_bytes_in_any_encoding() {
    // Shift_JIS 'ソ' is 0x83 0x5C: its second byte is a backslash. The codec
    // hands the bytes over as they are; reading them is the worker's job.
    let sjis = b"SELECT '\x83\x5c'";
    let mut buf = BytesMut::new();
    query(&mut buf, sjis);
    let f = frames(&buf);
    assert_eq!(
        FrontendMessage::parse(&f[0]).unwrap(),
        FrontendMessage::Query(sjis)
    );
    let mut body = b"s\0".to_vec();
    body.extend_from_slice(b"SELECT '\xe9'\0\0\0");
    assert_eq!(
        FrontendMessage::parse(&Frame::new(b'P', &body)).unwrap(),
        FrontendMessage::Parse(Parse {
            statement: "s",
            query: b"SELECT '\xe9'",
            param_types: vec![],
        })
    );
    assert_eq!(
        FrontendMessage::parse(&Frame::new(b'f', b"abgebrochen \xe9\0")).unwrap(),
        FrontendMessage::CopyFail(b"abgebrochen \xe9")
    );
}

#[test]
fn malformed_bodies_are_errors_not_panics() {
    for (tag, body) in [
        (b'Q', &b"no terminator"[..]),
        (b'B', &b"p\0s\0\xff\xff"[..]),
        (b'B', &b"p\0s\0\0\0\0\x01\xff\xff\xff\xfe"[..]),
        (b'E', &b"p\0\0"[..]),
        (b'C', &b"Xname\0"[..]),
        // Names must be UTF-8; only statement text may be in another encoding.
        (b'P', &b"\xff\0select 1\0\0\0"[..]),
        (b'E', &b"\x83\\\0\0\0\0\0"[..]),
    ] {
        assert!(
            FrontendMessage::parse(&Frame::new(tag, body)).is_err(),
            "{}",
            tag as char
        );
    }
}

#[test]
fn backend_messages_round_trip_through_encoders() {
    let mut buf = BytesMut::new();
    error_response(&mut buf, "ERROR", "08006", "event log unavailable");
    ready_for_query(&mut buf, TransactionStatus::InTransaction);
    parameter_status(&mut buf, "server_version", "15.19");
    backend_key_data(&mut buf, 1, 2);
    authentication_cleartext_password(&mut buf);
    let f = frames(&buf);
    let msgs: Vec<_> = f
        .iter()
        .map(|f| BackendMessage::parse(f).unwrap())
        .collect();
    assert_eq!(
        msgs[0],
        BackendMessage::ErrorResponse(ErrorFields {
            severity: "ERROR".into(),
            code: "08006".into(),
            message: "event log unavailable".into()
        })
    );
    assert_eq!(
        msgs[1],
        BackendMessage::ReadyForQuery(TransactionStatus::InTransaction)
    );
    assert_eq!(
        msgs[2],
        BackendMessage::ParameterStatus {
            name: "server_version",
            value: "15.19"
        }
    );
    assert_eq!(
        msgs[3],
        BackendMessage::BackendKeyData {
            process_id: 1,
            secret_key: 2
        }
    );
    assert_eq!(
        msgs[4],
        BackendMessage::Authentication { code: 3, data: &[] }
    );
}

#[test]
fn complete_frames_stops_at_a_partial_frame() {
    let mut buf = BytesMut::new();
    ready_for_query(&mut buf, TransactionStatus::Idle);
    query(&mut buf, "select 1");
    let whole = buf.len();
    query(&mut buf, "select 2");
    let cut = &buf[..buf.len() - 3];
    let mut tags = Vec::new();
    let n = complete_frames(cut, 1 << 20, |t, _| tags.push(t)).unwrap();
    assert_eq!(n, whole);
    assert_eq!(tags, vec![b'Z', b'Q']);
    assert_eq!(
        pending_frame_len(&cut[n..], 1 << 20).unwrap(),
        Some(buf.len() - whole)
    );
}

#[test]
fn password_text_requires_one_terminated_string() {
    assert_eq!(password_text(b"eyJ.a.b\0").unwrap(), "eyJ.a.b");
    assert!(password_text(b"eyJ").is_err());
    assert!(password_text(b"a\0b\0").is_err());
}

/// Pseudo-random inputs through every decoder: no panics, whatever arrives.
#[test]
fn arbitrary_bytes_never_panic() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for len in 0..2000usize {
        let data: Vec<u8> = (0..len % 97)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Bias towards small lengths and known tags.
                match state % 5 {
                    0 => 0,
                    1 => b"QPBEDCSXpdZRK"[(state >> 8) as usize % 13],
                    _ => (state >> 16) as u8,
                }
            })
            .collect();
        fuzz_input(&data);
    }
}

/// A header alone (a `Query` claiming 1 GiB, say) makes room only for what
/// may arrive soon, never for the whole claimed frame; the frame still
/// decodes once all of it is there.
#[test]
fn a_header_alone_claims_no_memory() {
    let max = 1 << 30;
    let mut buf = BytesMut::from(&[b'Q', 0x3f, 0xff, 0xff, 0xf0][..]);
    assert!(decode_frame(&mut buf, max).unwrap().is_none());
    assert!(
        buf.capacity() <= 5 + RESERVE_AHEAD + 64,
        "{} bytes reserved for a 5-byte header",
        buf.capacity()
    );

    // A 1 MiB frame arriving in pieces grows its buffer as it comes.
    let body = vec![b'x'; 1 << 20];
    let mut whole = BytesMut::new();
    whole.extend_from_slice(b"Q");
    whole.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    whole.extend_from_slice(&body);
    let mut buf = BytesMut::new();
    let mut frame = None;
    for piece in whole.chunks(100_000) {
        assert!(frame.is_none());
        buf.extend_from_slice(piece);
        frame = decode_frame(&mut buf, max).unwrap();
        if frame.is_none() {
            assert!(buf.capacity() <= 4 * buf.len() + RESERVE_AHEAD + 64);
        }
    }
    assert_eq!(frame.expect("whole").body(), &body[..]);
}
