// AES-256-GCM into the caller's buffers (gcm.c), built by scripts/setup beside holes.node.
module.exports = require('./build/Release/gcm.node');
