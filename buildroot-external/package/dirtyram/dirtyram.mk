################################################################################
#
# dirtyram
#
################################################################################

DIRTYRAM_VERSION = 1.0
DIRTYRAM_SITE = $(BR2_EXTERNAL_DIRTYLOG_PATH)/../dirtyram-src
DIRTYRAM_SITE_METHOD = local
DIRTYRAM_LICENSE = GPL-2.0+
# The guest's /init runs /root/dirtyram.arm on every architecture (builder/guest/init).
DIRTYRAM_INSTALL_PATH = /root/dirtyram.arm

define DIRTYRAM_BUILD_CMDS
	$(TARGET_MAKE_ENV) $(MAKE) -C $(@D) CC="$(TARGET_CC)" O=$(@D)
endef

define DIRTYRAM_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0755 $(@D)/dirtyram $(TARGET_DIR)$(DIRTYRAM_INSTALL_PATH)
endef

$(eval $(generic-package))
