from django.contrib import admin

admin.site.site_header = "Nimbus back office"
admin.site.site_title = "Nimbus"
admin.site.index_title = "Platform operations"
