{
  "targets": [
    {
      "target_name": "holes",
      "sources": ["holes.c"],
      "cflags": ["-O2", "-Wall"]
    },
    {
      "target_name": "gcm",
      "sources": ["gcm.c"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
