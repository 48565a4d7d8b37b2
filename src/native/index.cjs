// Built by `npm rebuild genvault-holes` (scripts/setup); see native-notes/prebuilt-binaries.md.
module.exports = require('./build/Release/holes.node');
