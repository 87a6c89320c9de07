include $(sort $(wildcard $(BR2_EXTERNAL_DIRTYLOG_PATH)/package/*/*.mk))
