use super::*;

fn context() -> ActivationContext {
    ActivationContext {
        deployment: "resnet-50@v3".into(),
        request_id: RequestId::from_bytes([7; 16]),
        hop: 1,
        direction: Direction::TowardNextStage,
    }
}

fn release_context() -> KeyReleaseContext {
    KeyReleaseContext {
        broker_id: "broker-a".into(),
        nonce: BrokerNonce::from_bytes([9; 32]),
        model: ModelId::new("resnet-50").unwrap(),
        stage: StageIndex(1),
    }
}

#[test]
fn activations_round_trip_at_several_sizes() {
    let stage = RecipientPrivateKey::generate().unwrap();
    for len in [0, 1, 1000, 1 << 20] {
        let plaintext: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let sealed = seal_activation(&stage.public_key(), &context(), &plaintext).unwrap();
        assert_eq!(sealed.ciphertext.len(), len + TAG_LEN);
        if len > 0 {
            // A short ciphertext matches its plaintext by chance (one byte: 1 in 256), so
            // the plaintext must not show in all of eight fresh seals (by chance: 2^-64).
            let n = len.min(64);
            let shows = |s: &Sealed| s.ciphertext[..n] == plaintext[..n];
            let all_show = shows(&sealed)
                && (1..8).all(|_| {
                    shows(&seal_activation(&stage.public_key(), &context(), &plaintext).unwrap())
                });
            assert!(!all_show, "a {len}-byte plaintext shows in its ciphertext");
        }
        let opened = open_activation(&stage, &context(), &sealed).unwrap();
        assert_eq!(opened.expose_secret(), &plaintext[..]);
    }
}

#[test]
fn sealing_in_place_encrypts_the_callers_buffer() {
    let stage = RecipientPrivateKey::generate().unwrap();
    for len in [0, 1000, 1 << 20] {
        let plaintext: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut buffer = Vec::with_capacity(len + TAG_LEN);
        buffer.extend_from_slice(&plaintext);
        let at = buffer.as_ptr();
        let sealed = seal_activation_in_place(&stage.public_key(), &context(), buffer).unwrap();
        // With room for the tag, the ciphertext is the caller's buffer: nothing moved.
        assert_eq!(sealed.ciphertext.as_ptr(), at);
        assert_eq!(sealed.ciphertext.len(), len + TAG_LEN);
        let opened = open_activation(&stage, &context(), &sealed).unwrap();
        assert_eq!(opened.expose_secret(), &plaintext[..]);
    }
    // Without room it still seals (the tag moves the buffer).
    let sealed = seal_activation_in_place(&stage.public_key(), &context(), vec![5; 10]).unwrap();
    assert_eq!(
        open_activation(&stage, &context(), &sealed)
            .unwrap()
            .expose_secret(),
        &[5; 10]
    );
}

#[test]
fn each_envelope_uses_a_fresh_encapsulation() {
    let stage = RecipientPrivateKey::generate().unwrap();
    let a = seal_activation(&stage.public_key(), &context(), b"same").unwrap();
    let b = seal_activation(&stage.public_key(), &context(), b"same").unwrap();
    assert_ne!(a.enc, b.enc);
    assert_ne!(a.ciphertext, b.ciphertext);
}

#[test]
fn an_activation_opens_only_in_its_own_context() {
    let stage = RecipientPrivateKey::generate().unwrap();
    let sealed = seal_activation(&stage.public_key(), &context(), b"activations").unwrap();
    let mut others = Vec::new();
    let mut c = context();
    c.request_id = RequestId::from_bytes([8; 16]);
    others.push(("request id", c));
    let mut c = context();
    c.hop = 2;
    others.push(("hop", c));
    let mut c = context();
    c.direction = Direction::TowardClient;
    others.push(("direction", c));
    let mut c = context();
    c.deployment = "resnet-50@v4".into();
    others.push(("deployment", c));
    for (what, other) in others {
        assert!(
            matches!(
                open_activation(&stage, &other, &sealed),
                Err(Error::OpenFailed)
            ),
            "opened under another {what}"
        );
    }
}

#[test]
fn the_wrong_private_key_does_not_open() {
    let stage = RecipientPrivateKey::generate().unwrap();
    let other = RecipientPrivateKey::generate().unwrap();
    let sealed = seal_activation(&stage.public_key(), &context(), b"activations").unwrap();
    assert!(matches!(
        open_activation(&other, &context(), &sealed),
        Err(Error::OpenFailed)
    ));
    let sealed = seal_key_release(&stage.public_key(), &release_context(), b"keys").unwrap();
    assert!(matches!(
        open_key_release(&other, &release_context(), &sealed),
        Err(Error::OpenFailed)
    ));
}

#[test]
fn any_changed_byte_is_refused() {
    let stage = RecipientPrivateKey::generate().unwrap();
    let sealed = seal_activation(&stage.public_key(), &context(), b"activations").unwrap();
    for i in 0..sealed.enc.len() {
        let mut bad = sealed.clone();
        bad.enc[i] ^= 0x01;
        assert!(
            matches!(
                open_activation(&stage, &context(), &bad),
                Err(Error::OpenFailed)
            ),
            "enc byte {i}"
        );
    }
    for i in 0..sealed.ciphertext.len() {
        let mut bad = sealed.clone();
        bad.ciphertext = xor_byte(&bad.ciphertext, i, 0x80);
        assert!(
            matches!(
                open_activation(&stage, &context(), &bad),
                Err(Error::OpenFailed)
            ),
            "ciphertext byte {i}"
        );
    }
    let mut cut = sealed.clone();
    cut.ciphertext.truncate(cut.ciphertext.len() - 1);
    assert!(matches!(
        open_activation(&stage, &context(), &cut),
        Err(Error::OpenFailed)
    ));
    cut.ciphertext.truncate(TAG_LEN - 1);
    assert!(matches!(
        open_activation(&stage, &context(), &cut),
        Err(Error::SealedMalformed(_))
    ));
}

#[test]
fn key_release_round_trips_and_is_bound_to_its_context() {
    let ephemeral = RecipientPrivateKey::generate().unwrap();
    let sealed = seal_key_release(
        &ephemeral.public_key(),
        &release_context(),
        b"dek and stage key",
    )
    .unwrap();
    let opened = open_key_release(&ephemeral, &release_context(), &sealed).unwrap();
    assert_eq!(opened.expose_secret(), b"dek and stage key");

    let mut c = release_context();
    c.nonce = BrokerNonce::from_bytes([10; 32]);
    let mut d = release_context();
    d.stage = StageIndex(2);
    let mut e = release_context();
    e.model = ModelId::new("resnet-51").unwrap();
    let mut f = release_context();
    f.broker_id = "broker-b".into();
    for other in [c, d, e, f] {
        assert!(matches!(
            open_key_release(&ephemeral, &other, &sealed),
            Err(Error::OpenFailed)
        ));
    }
    let mut bad = sealed.clone();
    bad.ciphertext = xor_byte(&bad.ciphertext, 0, 1);
    assert!(matches!(
        open_key_release(&ephemeral, &release_context(), &bad),
        Err(Error::OpenFailed)
    ));
}

#[test]
fn the_two_aead_paths_and_purposes_never_cross() {
    let key = RecipientPrivateKey::generate().unwrap();
    let aad = context().aad();
    let info = ACTIVATION_DOMAIN.as_bytes();
    let small = seal_to(&key.public_key(), info, &aad, b"payload").unwrap();
    let bulk = seal_bulk_to(&key.public_key(), info, &aad, b"payload").unwrap();
    assert_eq!(
        open_sealed(&key, info, &aad, &small)
            .unwrap()
            .expose_secret(),
        b"payload"
    );
    assert!(matches!(
        open_sealed_bulk(&key, info, &aad, &small),
        Err(Error::OpenFailed)
    ));
    assert!(matches!(
        open_sealed(&key, info, &aad, &bulk),
        Err(Error::OpenFailed)
    ));
    // Same AAD bytes, another purpose (info): refused.
    assert!(matches!(
        open_sealed_bulk(&key, b"another purpose", &aad, &bulk),
        Err(Error::OpenFailed)
    ));
}

#[test]
fn wire_form_round_trips_and_malformed_wire_is_refused() {
    let stage = RecipientPrivateKey::generate().unwrap();
    let sealed = seal_activation(&stage.public_key(), &context(), b"x").unwrap();
    let wire: shardseal_proto::v1::Sealed = sealed.clone().into();
    assert_eq!(wire.enc, sealed.enc.to_vec());
    let back = Sealed::try_from(wire.clone()).unwrap();
    assert_eq!(back, sealed);
    let mut short_enc = wire.clone();
    short_enc.enc.truncate(31);
    assert!(matches!(
        Sealed::try_from(short_enc),
        Err(Error::SealedMalformed("enc is not 32 bytes"))
    ));
    let mut short_ct = wire;
    short_ct.ciphertext.truncate(3);
    assert!(matches!(
        Sealed::try_from(short_ct),
        Err(Error::SealedMalformed("ciphertext shorter than its tag"))
    ));
}

#[test]
fn sealing_to_a_low_order_key_is_refused() {
    // The all-zero point gives an all-zero shared secret; HPKE refuses it.
    let zero = RecipientPublicKey::from_bytes([0; 32]);
    assert!(matches!(
        seal_activation(&zero, &context(), b"x"),
        Err(Error::SealFailed)
    ));
}

#[test]
fn private_keys_round_trip_through_their_bytes() {
    let key = RecipientPrivateKey::generate().unwrap();
    let again = RecipientPrivateKey::from_bytes(key.expose_secret().expose_secret()).unwrap();
    assert_eq!(again, key);
    assert_eq!(again.public_key(), key.public_key());
    assert_ne!(key, RecipientPrivateKey::generate().unwrap());
    assert!(matches!(
        RecipientPrivateKey::from_bytes(&[1; 31]),
        Err(Error::InvalidLength {
            expected: 32,
            actual: 31,
            ..
        })
    ));
    let sealed = seal_activation(&key.public_key(), &context(), b"x").unwrap();
    assert_eq!(
        open_activation(&again, &context(), &sealed)
            .unwrap()
            .expose_secret(),
        b"x"
    );
}

#[test]
fn debug_of_a_private_key_shows_only_the_public_half() {
    let key = RecipientPrivateKey::generate().unwrap();
    let secret_hex = hex::encode(key.expose_secret().expose_secret());
    let shown = format!("{key:?}");
    assert_eq!(
        shown,
        format!(
            "RecipientPrivateKey(<redacted>, public {})",
            key.public_key()
        )
    );
    assert!(!shown.contains(&secret_hex));
}

#[test]
fn ids_and_public_keys_print_and_parse_as_hex() {
    let id = RequestId::from_bytes([0xab; 16]);
    assert_eq!(id.to_string(), "ab".repeat(16));
    assert_eq!(id.to_string().parse::<RequestId>().unwrap(), id);
    assert_eq!(format!("{id:?}"), format!("RequestId({})", "ab".repeat(16)));
    assert!(RequestId::from_slice(&[0; 15]).is_err());
    assert_ne!(RequestId::random().unwrap(), RequestId::random().unwrap());

    let pk = RecipientPrivateKey::generate().unwrap().public_key();
    assert_eq!(pk.to_string().parse::<RecipientPublicKey>().unwrap(), pk);
    let json = serde_json::to_string(&pk).unwrap();
    assert_eq!(json, format!("\"{pk}\""));
    assert_eq!(
        serde_json::from_str::<RecipientPublicKey>(&json).unwrap(),
        pk
    );
    assert!(matches!(
        "zz".parse::<RecipientPublicKey>(),
        Err(Error::InvalidEncoding(_))
    ));
}

#[test]
fn context_encodings_are_unambiguous() {
    // Moving bytes between adjacent fields changes the encoding.
    let a = ContextEncoder::new("d").text("ab").text("c").finish();
    let b = ContextEncoder::new("d").text("a").text("bc").finish();
    assert_ne!(a, b);
    assert_eq!(
        ContextEncoder::new("d").u32(258).finish(),
        [0, 0, 0, 1, b'd', 0, 0, 0, 4, 0, 0, 1, 2]
    );
    assert_ne!(context().aad(), release_context().aad());
}

/// `bytes` with `mask` xored into byte `at`.
fn xor_byte(bytes: &[u8], at: usize, mask: u8) -> bytes::Bytes {
    let mut changed = bytes.to_vec();
    changed[at] ^= mask;
    changed.into()
}
