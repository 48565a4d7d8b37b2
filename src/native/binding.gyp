{
  "targets": [
    {
      "target_name": "holes",
      "sources": ["holes.c"],
      "cflags": ["-O2", "-Wall"]
    }
  ]
}
