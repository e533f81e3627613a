//! Sealed envelopes (activations and key releases) from untrusted peers: arbitrary bytes
//! never panic and never open, every valid envelope round-trips, and any single-bit flip,
//! truncation, other context or other key is refused with the exact typed error.

use proptest::prelude::*;
use shardseal_attestation::{ModelId, Nonce, StageIndex};
use shardseal_keys::{
    ActivationContext, Direction, Error, KeyReleaseContext, PUBLIC_KEY_LEN, RecipientPrivateKey,
    RequestId, Sealed, TAG_LEN, open_activation, open_key_release, seal_activation,
    seal_key_release,
};

fn key(seed: u8) -> RecipientPrivateKey {
    // Any 32 bytes are an X25519 private key (clamped); fixed seeds keep cases reproducible.
    RecipientPrivateKey::from_bytes(&[seed; 32]).unwrap()
}

fn activation_context() -> impl Strategy<Value = ActivationContext> {
    (
        "[a-z0-9@.-]{0,24}",
        any::<[u8; 16]>(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(|(deployment, id, hop, back)| ActivationContext {
            deployment,
            request_id: RequestId::from_bytes(id),
            hop,
            direction: if back {
                Direction::TowardClient
            } else {
                Direction::TowardNextStage
            },
        })
}

fn release_context() -> impl Strategy<Value = KeyReleaseContext> {
    (
        "[a-z0-9-]{0,16}",
        any::<[u8; 32]>(),
        "[a-z][a-z0-9-]{0,15}",
        any::<u32>(),
    )
        .prop_map(|(broker_id, nonce, model, stage)| KeyReleaseContext {
            broker_id,
            nonce: Nonce::from_bytes(nonce),
            model: ModelId::new(model).unwrap(),
            stage: StageIndex(stage),
        })
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..600)
}

/// Flips bit `bit` of byte `at` of the envelope's wire bytes (`enc` then `ciphertext`).
fn flip(sealed: &Sealed, at: usize, bit: u8) -> Sealed {
    let mut bad = sealed.clone();
    let at = at % (PUBLIC_KEY_LEN + bad.ciphertext.len());
    match at.checked_sub(PUBLIC_KEY_LEN) {
        None => bad.enc[at] ^= 1 << (bit % 8),
        Some(i) => {
            let mut ciphertext = bad.ciphertext.to_vec();
            ciphertext[i] ^= 1 << (bit % 8);
            bad.ciphertext = ciphertext.into();
        }
    }
    bad
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_envelopes_never_open(
        enc in any::<[u8; 32]>(),
        ciphertext in prop::collection::vec(any::<u8>(), 0..300),
        activation in activation_context(),
        release in release_context(),
    ) {
        let sealed = Sealed { enc, ciphertext: ciphertext.into() };
        let short = sealed.ciphertext.len() < TAG_LEN;
        for result in [
            open_activation(&key(1), &activation, &sealed),
            open_key_release(&key(1), &release, &sealed),
        ] {
            match result {
                Err(Error::SealedMalformed(_)) => prop_assert!(short),
                Err(Error::OpenFailed) => {}
                other => prop_assert!(false, "forged envelope: {:?}", other.map(|p| p.len())),
            }
        }
    }

    #[test]
    fn arbitrary_wire_envelopes_are_refused_with_sealed_malformed(
        enc in prop::collection::vec(any::<u8>(), 0..64),
        ciphertext in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let well_formed = enc.len() == PUBLIC_KEY_LEN && ciphertext.len() >= TAG_LEN;
        let wire = shardseal_proto::v1::Sealed { enc: enc.into(), ciphertext: ciphertext.into() };
        match Sealed::try_from(wire.clone()) {
            Ok(sealed) => {
                prop_assert!(well_formed);
                prop_assert_eq!(shardseal_proto::v1::Sealed::from(sealed), wire);
            }
            Err(Error::SealedMalformed(_)) => prop_assert!(!well_formed),
            Err(other) => prop_assert!(false, "unexpected error {other:?}"),
        }
    }

    #[test]
    fn activations_round_trip(context in activation_context(), plaintext in payload()) {
        let stage = key(2);
        let sealed = seal_activation(&stage.public_key(), &context, &plaintext).unwrap();
        prop_assert_eq!(sealed.ciphertext.len(), plaintext.len() + TAG_LEN);
        let wire = shardseal_proto::v1::Sealed::from(sealed.clone());
        let back = Sealed::try_from(wire).unwrap();
        let opened = open_activation(&stage, &context, &back).unwrap();
        prop_assert_eq!(opened.expose_secret(), &plaintext[..]);
    }

    #[test]
    fn key_releases_round_trip(context in release_context(), bundle in payload()) {
        let function = key(3);
        let sealed = seal_key_release(&function.public_key(), &context, &bundle).unwrap();
        let opened = open_key_release(&function, &context, &sealed).unwrap();
        prop_assert_eq!(opened.expose_secret(), &bundle[..]);
    }

    #[test]
    fn any_single_bit_flip_of_an_activation_is_refused(
        context in activation_context(),
        plaintext in payload(),
        at in any::<usize>(),
        bit in any::<u8>(),
    ) {
        let stage = key(4);
        let sealed = seal_activation(&stage.public_key(), &context, &plaintext).unwrap();
        let bad = flip(&sealed, at, bit);
        prop_assert!(matches!(open_activation(&stage, &context, &bad), Err(Error::OpenFailed)));
    }

    #[test]
    fn any_single_bit_flip_of_a_key_release_is_refused(
        context in release_context(),
        bundle in payload(),
        at in any::<usize>(),
        bit in any::<u8>(),
    ) {
        let function = key(5);
        let sealed = seal_key_release(&function.public_key(), &context, &bundle).unwrap();
        let bad = flip(&sealed, at, bit);
        prop_assert!(matches!(open_key_release(&function, &context, &bad), Err(Error::OpenFailed)));
    }

    #[test]
    fn every_truncation_is_refused(
        context in activation_context(),
        plaintext in payload(),
        cut in any::<usize>(),
    ) {
        let stage = key(6);
        let mut sealed = seal_activation(&stage.public_key(), &context, &plaintext).unwrap();
        let keep = cut % sealed.ciphertext.len();
        sealed.ciphertext.truncate(keep);
        let result = open_activation(&stage, &context, &sealed);
        if keep < TAG_LEN {
            prop_assert!(matches!(result, Err(Error::SealedMalformed(_))));
        } else {
            prop_assert!(matches!(result, Err(Error::OpenFailed)));
        }
    }

    #[test]
    fn an_activation_never_opens_under_another_context(
        context in activation_context(),
        other in activation_context(),
        plaintext in payload(),
    ) {
        prop_assume!(context != other);
        let stage = key(7);
        let sealed = seal_activation(&stage.public_key(), &context, &plaintext).unwrap();
        prop_assert!(matches!(open_activation(&stage, &other, &sealed), Err(Error::OpenFailed)));
    }

    #[test]
    fn a_key_release_never_opens_under_another_context(
        context in release_context(),
        other in release_context(),
        bundle in payload(),
    ) {
        prop_assume!(context != other);
        let function = key(8);
        let sealed = seal_key_release(&function.public_key(), &context, &bundle).unwrap();
        prop_assert!(matches!(open_key_release(&function, &other, &sealed), Err(Error::OpenFailed)));
    }

    #[test]
    fn an_activation_sealed_to_a_rotated_out_key_does_not_open(
        context in activation_context(),
        plaintext in payload(),
    ) {
        // After rotation the stage holds a new keypair; a sender still using the old public
        // key (a stale manifest) produces envelopes the new key cannot open.
        let old = RecipientPrivateKey::generate().unwrap();
        let new = RecipientPrivateKey::generate().unwrap();
        let sealed = seal_activation(&old.public_key(), &context, &plaintext).unwrap();
        prop_assert!(matches!(open_activation(&new, &context, &sealed), Err(Error::OpenFailed)));
    }

    #[test]
    fn activation_and_key_release_envelopes_never_cross(
        activation in activation_context(),
        release in release_context(),
        plaintext in payload(),
    ) {
        let k = key(9);
        let as_activation = seal_activation(&k.public_key(), &activation, &plaintext).unwrap();
        prop_assert!(matches!(open_key_release(&k, &release, &as_activation), Err(Error::OpenFailed)));
        let as_release = seal_key_release(&k.public_key(), &release, &plaintext).unwrap();
        prop_assert!(matches!(open_activation(&k, &activation, &as_release), Err(Error::OpenFailed)));
    }
}
