//! A sealed activation in pieces, as `StageFunction.ProcessPieces` carries it.
//!
//! The coordinator relays each stage's answer to the next stage piece by piece, as it
//! arrives, instead of after the whole answer: the next stage receives most of its input
//! while the previous one is still sending, where a whole-message relay makes each cut
//! two transfers end to end (BENCHMARKS.md, "A streaming relay"). Pieces change nothing
//! about the envelope: concatenated, they are the one HPKE ciphertext `Process` would
//! carry, authenticated as a whole when the stage opens it. A receiver only checks that
//! the pieces add up to the length the first one announced, no more and no less, within
//! its own limit, before it lets the whole go on.

use bytes::{Bytes, BytesMut};

use crate::v1::{ActivationPiece, RequestHeader, Sealed, StageTiming};

/// The largest piece sent: in an interleaved relay experiment, pieces of 16, 64 and
/// 256 KiB came within 0.1 ms of one another.
pub const PIECE_BYTES: usize = 64 << 10;

/// Why a sequence of pieces is not one sealed activation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PieceError {
    /// The stream ended before its first piece.
    #[error("no activations")]
    Empty,
    /// The first piece lacks the HPKE encapsulated key.
    #[error("the first piece of the activations carries no encapsulated key")]
    NoKey,
    /// The first piece announces more than the receiver takes.
    #[error("the activations announce {announced} bytes, more than the {limit} accepted")]
    TooLarge {
        /// The announced ciphertext length.
        announced: u64,
        /// The receiver's limit.
        limit: usize,
    },
    /// The pieces carry more than the first announced.
    #[error("the activations carry more than the {announced} bytes announced")]
    Overrun {
        /// The announced ciphertext length.
        announced: u64,
    },
    /// The pieces ended before the announced length.
    #[error("the activations ended {missing} bytes short of the {announced} announced")]
    Short {
        /// Bytes still missing.
        missing: u64,
        /// The announced ciphertext length.
        announced: u64,
    },
    /// A later piece carries a field only the first may.
    #[error("a later piece of the activations carries a header, key or length")]
    Misplaced,
}

/// A sealed activation received (or held) whole, as the pieces it came in: slices of the
/// messages they arrived in, never copied until [`Pieces::into_sealed`].
#[derive(Debug, Clone)]
pub struct Pieces {
    enc: Bytes,
    announced: u64,
    received: u64,
    parts: Vec<Bytes>,
    timing: Option<StageTiming>,
}

impl Pieces {
    /// The whole `sealed`, cut into pieces of at most [`PIECE_BYTES`] (slices, no copy).
    pub fn from_sealed(sealed: Sealed) -> Self {
        let Sealed { enc, ciphertext } = sealed;
        let len = ciphertext.len();
        let parts = (0..len)
            .step_by(PIECE_BYTES)
            .map(|at| ciphertext.slice(at..(at + PIECE_BYTES).min(len)))
            .collect();
        Self {
            enc,
            announced: len as u64,
            received: len as u64,
            parts,
            timing: None,
        }
    }

    /// The whole `sealed` as one piece: for a sender that holds it all already (the
    /// client's request, received whole), where cutting it would only add messages.
    pub fn whole(sealed: Sealed) -> Self {
        let Sealed { enc, ciphertext } = sealed;
        let len = ciphertext.len() as u64;
        Self {
            enc,
            announced: len,
            received: len,
            parts: if ciphertext.is_empty() {
                Vec::new()
            } else {
                vec![ciphertext]
            },
            timing: None,
        }
    }

    /// Starts gathering from `first`, refusing an announced length over `limit` bytes.
    pub fn start(first: ActivationPiece, limit: usize) -> Result<Self, PieceError> {
        if first.enc.is_empty() {
            return Err(PieceError::NoKey);
        }
        if first.ciphertext_len > limit as u64 {
            return Err(PieceError::TooLarge {
                announced: first.ciphertext_len,
                limit,
            });
        }
        let mut pieces = Self {
            enc: first.enc,
            announced: first.ciphertext_len,
            received: 0,
            parts: Vec::new(),
            timing: None,
        };
        pieces.take(first.ciphertext, first.timing)?;
        Ok(pieces)
    }

    /// Adds the next piece.
    pub fn push(&mut self, piece: ActivationPiece) -> Result<(), PieceError> {
        if piece.header.is_some() || !piece.enc.is_empty() || piece.ciphertext_len != 0 {
            return Err(PieceError::Misplaced);
        }
        self.take(piece.ciphertext, piece.timing)
    }

    fn take(&mut self, ciphertext: Bytes, timing: Option<StageTiming>) -> Result<(), PieceError> {
        let received = self.received + ciphertext.len() as u64;
        if received > self.announced {
            return Err(PieceError::Overrun {
                announced: self.announced,
            });
        }
        self.received = received;
        if !ciphertext.is_empty() {
            self.parts.push(ciphertext);
        }
        if timing.is_some() {
            self.timing = timing;
        }
        Ok(())
    }

    /// Whether every announced byte is here.
    pub fn is_complete(&self) -> bool {
        self.received == self.announced
    }

    /// The stage timing the answer's pieces carried, if any.
    pub fn timing(&self) -> Option<StageTiming> {
        self.timing
    }

    /// Checks that every announced byte arrived.
    pub fn finish(self) -> Result<Self, PieceError> {
        if self.is_complete() {
            Ok(self)
        } else {
            Err(PieceError::Short {
                missing: self.announced - self.received,
                announced: self.announced,
            })
        }
    }

    /// The whole envelope in one buffer: the one piece as it is, or the pieces copied once.
    pub fn into_sealed(self) -> Sealed {
        let ciphertext = match <[Bytes; 1]>::try_from(self.parts) {
            Ok([one]) => one,
            Err(parts) => {
                let mut whole = BytesMut::with_capacity(self.received as usize);
                for part in &parts {
                    whole.extend_from_slice(part);
                }
                whole.freeze()
            }
        };
        Sealed {
            enc: self.enc,
            ciphertext,
        }
    }

    /// The pieces to send: the first carrying the key and the length, and `header` and
    /// `stage` if given (a request), the last carrying `timing` if given (an answer).
    pub fn to_messages(
        &self,
        header: Option<&RequestHeader>,
        stage: u32,
        timing: Option<StageTiming>,
    ) -> Vec<ActivationPiece> {
        let mut messages: Vec<ActivationPiece> = self
            .parts
            .iter()
            .map(|part| ActivationPiece {
                ciphertext: part.clone(),
                ..Default::default()
            })
            .collect();
        if messages.is_empty() {
            messages.push(ActivationPiece::default());
        }
        let first = &mut messages[0];
        first.header = header.cloned();
        first.stage = stage;
        first.enc = self.enc.clone();
        first.ciphertext_len = self.announced;
        if let Some(last) = messages.last_mut() {
            last.timing = timing;
        }
        messages
    }
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    fn sealed(len: usize) -> Sealed {
        Sealed {
            enc: Bytes::from_static(&[9; 32]),
            ciphertext: Bytes::from((0..len).map(|i| i as u8).collect::<Vec<u8>>()),
        }
    }

    fn gather(messages: Vec<ActivationPiece>, limit: usize) -> Result<Pieces, PieceError> {
        let mut messages = messages.into_iter();
        let mut pieces = Pieces::start(messages.next().ok_or(PieceError::Empty)?, limit)?;
        for message in messages {
            pieces.push(message)?;
        }
        pieces.finish()
    }

    #[test]
    fn pieces_add_up_to_the_envelope_they_were_cut_from() {
        let header = RequestHeader {
            model_id: "m".into(),
            ..Default::default()
        };
        let timing = StageTiming {
            stage: 1,
            run_ms: 2.0,
            ..Default::default()
        };
        for len in [
            0,
            1,
            PIECE_BYTES - 1,
            PIECE_BYTES,
            PIECE_BYTES + 1,
            3 * PIECE_BYTES + 5,
        ] {
            let whole = sealed(len);
            let messages =
                Pieces::from_sealed(whole.clone()).to_messages(Some(&header), 3, Some(timing));
            assert_eq!(messages.len(), len.div_ceil(PIECE_BYTES).max(1));
            assert!(messages.iter().all(|m| m.ciphertext.len() <= PIECE_BYTES));
            assert_eq!(messages[0].header.as_ref(), Some(&header));
            assert_eq!(messages[0].stage, 3);
            assert_eq!(messages.last().unwrap().timing, Some(timing));
            let back = gather(messages, len).unwrap();
            assert_eq!(back.timing(), Some(timing));
            assert_eq!(back.into_sealed(), whole, "{len} bytes");

            let one = Pieces::whole(whole.clone()).to_messages(Some(&header), 3, None);
            assert_eq!(one.len(), 1);
            assert_eq!(
                gather(one, len).unwrap().into_sealed(),
                whole,
                "{len} bytes whole"
            );
        }
    }

    #[test]
    fn more_or_less_than_announced_or_over_the_limit_is_refused() {
        let messages = Pieces::from_sealed(sealed(2 * PIECE_BYTES)).to_messages(None, 0, None);

        let mut short = messages.clone();
        short.pop();
        assert_eq!(
            gather(short, usize::MAX).unwrap_err(),
            PieceError::Short {
                missing: PIECE_BYTES as u64,
                announced: 2 * PIECE_BYTES as u64
            }
        );

        let mut long = messages.clone();
        long.push(ActivationPiece {
            ciphertext: Bytes::from_static(b"x"),
            ..Default::default()
        });
        assert!(matches!(
            gather(long, usize::MAX),
            Err(PieceError::Overrun { .. })
        ));

        assert!(matches!(
            gather(messages.clone(), 2 * PIECE_BYTES - 1),
            Err(PieceError::TooLarge { .. })
        ));

        let mut second_key = messages.clone();
        second_key[1].enc = Bytes::from_static(&[1; 32]);
        assert_eq!(
            gather(second_key, usize::MAX).unwrap_err(),
            PieceError::Misplaced
        );

        let mut second_header = messages.clone();
        second_header[1].header = Some(RequestHeader::default());
        assert_eq!(
            gather(second_header, usize::MAX).unwrap_err(),
            PieceError::Misplaced
        );

        let mut keyless = messages;
        keyless[0].enc = Bytes::new();
        assert_eq!(gather(keyless, usize::MAX).unwrap_err(), PieceError::NoKey);
        assert_eq!(
            gather(Vec::new(), usize::MAX).unwrap_err(),
            PieceError::Empty
        );
    }

    proptest! {
        #[test]
        fn arbitrary_pieces_gather_to_exactly_the_announced_length_or_are_refused(
            honest in any::<bool>(),
            other in 0u64..600,
            limit in 0usize..1200,
            keyed in any::<bool>(),
            parts in vec((vec(any::<u8>(), 0..200), any::<bool>(), any::<bool>(), any::<bool>()), 1..6),
        ) {
            let total: u64 = parts.iter().map(|(b, ..)| b.len() as u64).sum();
            let announced = if honest { total } else { other };
            let messages: Vec<ActivationPiece> = parts
                .iter()
                .enumerate()
                .map(|(i, (bytes, key, header, timing))| ActivationPiece {
                    enc: if (i == 0 && keyed) || (i > 0 && *key) { Bytes::from_static(&[1; 32]) } else { Bytes::new() },
                    ciphertext_len: if i == 0 { announced } else { 0 },
                    header: (i > 0 && *header).then(RequestHeader::default),
                    ciphertext: Bytes::from(bytes.clone()),
                    timing: timing.then(StageTiming::default),
                    ..Default::default()
                })
                .collect();
            let clean = parts[1..].iter().all(|(_, key, header, _)| !key && !header);
            match gather(messages, limit) {
                Ok(pieces) => {
                    prop_assert!(keyed && clean && announced <= limit as u64 && total == announced);
                    prop_assert_eq!(pieces.into_sealed().ciphertext.len() as u64, announced);
                }
                Err(_) => prop_assert!(!keyed || !clean || announced > limit as u64 || total != announced),
            }
        }
    }
}
