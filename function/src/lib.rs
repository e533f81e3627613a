//! The ShardSeal serverless function: attests to the key broker, opens its own model
//! shard, and runs it with tract on activations sealed to its stage.
