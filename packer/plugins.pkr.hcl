# Plugins for current Packer (>= 1.7): `packer init packer/` installs them.
# Kept apart from the template so that older Packer releases, which do not know this
# block, can still check the template itself (tests/test_packer.py).
packer {
  required_plugins {
    amazon = {
      version = ">= 1.3.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}
